"""Small synthetic shard sets for any test: `make_synthetic_shards(tmp_path)`.

Writes train/, val/ and zeroshot/ with the real data_tools writer (the same code as
`clip-data synthetic`): about 0.5 s for ~500 samples at 64 px. Calling it again on the same
folder with the same arguments reuses the finished shards (the writer's resume).
"""
from __future__ import annotations

import json
from pathlib import Path

from data_tools.synthetic import write_synthetic


def shard_pattern(folder: Path) -> str:
    """Brace pattern naming every shard of a set, e.g. 'DIR/shard-{000000..000003}.tar'."""
    names = sorted(json.loads((Path(folder) / "sizes.json").read_text()))
    first, last = names[0].rsplit("-", 1)[1][:-4], names[-1].rsplit("-", 1)[1][:-4]
    prefix = names[0].rsplit("-", 1)[0]
    return str(Path(folder) / f"{prefix}-{{{first}..{last}}}.tar")


def make_synthetic_shards(out_dir, train: int = 256, val: int = 64, zeroshot: int = 64,
                          samples_per_shard: int = 64, image_size: int = 64,
                          seed: int = 0) -> dict:
    """Write the synthetic set under out_dir and return where it is.

    Keys: "root"; "train", "val", "zeroshot" (folders: shards + sizes.json + manifest.json;
    zeroshot/ also classnames.txt and zeroshot_classification_templates.txt); and
    "train_shards", "val_shards", "zeroshot_shards" (brace patterns of the tar files) and
    "train_count", "val_count", "zeroshot_count" (samples written). Splits of size 0 are absent.
    Samples: KEY.jpg, KEY.txt (one caption), KEY.json ("captions": 5 captions, "label", ...),
    and KEY.cls in zeroshot/.
    """
    out_dir = Path(out_dir)
    folders = write_synthetic(out_dir, train=train, val=val, zeroshot=zeroshot,
                              image_size=image_size, seed=seed,
                              samples_per_shard=samples_per_shard, progress=False,
                              overwrite=True)
    paths: dict = {"root": out_dir}
    for split, folder in folders.items():
        paths[split] = folder
        paths[f"{split}_shards"] = shard_pattern(folder)
        paths[f"{split}_count"] = sum(json.loads((folder / "sizes.json").read_text()).values())
    return paths


class CountingSource:
    """A tiny writer Source for tests: item i is KEY.txt = "item i"; items whose index is a
    multiple of `skip_every` (if set) are skipped with reason "test_skip"; item `crash_at` (if
    set) raises RuntimeError, like a process dying mid-shard. Picklable, so it also runs in the
    writer's worker processes."""

    def __init__(self, size: int, skip_every: int = 0, crash_at: int = -1):
        self.size, self.skip_every, self.crash_at = size, skip_every, crash_at

    def __len__(self) -> int:
        return self.size

    def describe(self, index: int) -> str:
        return f"item {index}"

    def sample(self, index: int) -> dict:
        from data_tools.errors import Skip

        if index == self.crash_at:
            raise RuntimeError(f"crash at item {index}")
        if self.skip_every and index % self.skip_every == 0:
            raise Skip("test_skip", f"multiple of {self.skip_every}")
        return {"txt": f"item {index}".encode(), "json": b'{"index": %d}' % index}


def write_image_zoo(folder) -> dict:
    """Good, awkward and bad image files for bad-input tests: {name: (path, skip reason or
    None)}. Good ones: RGB JPEG 400x300, small PNG 40x30, CMYK JPEG, L, LA, RGBA, P, P with
    transparency, 16-bit grayscale PNG, JPEG with EXIF orientation 6 (shown rotated 90 degrees).
    Bad ones: zero-byte, truncated JPEG, random bytes, a 9500x9500 decompression bomb (11 kB
    PNG), a path that does not exist."""
    from io import BytesIO

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8), "RGB")
    zoo = {}

    def save(name, image, reason=None, **kwargs):
        image.save(folder / name, **kwargs)
        zoo[name] = (folder / name, reason)

    def raw(name, data, reason):
        (folder / name).write_bytes(data)
        zoo[name] = (folder / name, reason)

    save("rgb.jpg", noise, quality=90)
    save("small.png", Image.new("RGB", (40, 30), (10, 200, 30)))
    save("cmyk.jpg", Image.new("CMYK", (64, 48), (255, 0, 0, 0)), quality=95)  # pure cyan
    save("gray.png", Image.new("L", (64, 48), 77))
    save("gray_alpha.png", Image.new("LA", (64, 48), (0, 0)))  # fully transparent -> white
    save("rgba.png", Image.new("RGBA", (64, 48), (255, 0, 0, 0)))  # transparent -> white
    palette = Image.new("P", (64, 48), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 1 = blue
    save("palette.png", palette)
    save("palette_transparent.png", palette, transparency=1)  # blue is transparent -> white
    save("gray16.png", Image.fromarray(np.full((48, 64), 32768, dtype=np.uint16)))
    oriented = Image.new("RGB", (60, 40), (0, 0, 255))
    oriented.paste((255, 0, 0), (0, 0, 10, 10))  # a red top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    save("exif_rotated.jpg", oriented, exif=exif.tobytes(), quality=95)
    buffer = BytesIO()
    noise.save(buffer, "JPEG", quality=90)
    raw("truncated.jpg", buffer.getvalue()[: len(buffer.getvalue()) // 2], "truncated_image")
    raw("zero.jpg", b"", "empty_image")
    raw("random.jpg", rng.integers(0, 256, size=2000, dtype=np.uint8).tobytes(), "corrupt_image")
    save("bomb.png", Image.new("1", (9500, 9500)), "decompression_bomb")
    zoo["missing.jpg"] = (folder / "missing.jpg", "missing_image")
    return zoo
