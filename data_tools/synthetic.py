"""The embedded synthetic set: coloured shapes whose captions truly describe them.

Each image shows 1-3 shapes of one kind, colour and size in one quadrant of a dark background;
its captions say the count, size, colour, shape and position ("two small red circles at the top
left") through several templates. Everything is drawn from a RNG seeded by (seed, split, index),
so the set is deterministic, offline, and each item can be built in any process. Three shard
sets are written: train/ (one caption in txt, all captions in json), val/ (a retrieval split with
5 different captions per image in json "captions") and zeroshot/ (labelled by colour + shape,
with classnames.txt and zeroshot_classification_templates.txt).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_tools.errors import DataError
from data_tools.images import FORMATS, ImageOptions, encode_image
from data_tools.shards import (ShardSetWriter, add_writer_arguments, ensure_writable_dir,
                               write_label_files)

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235),
           "yellow": (235, 220, 50), "purple": (160, 60, 210), "orange": (245, 140, 30)}
SIZES = {"small": 0.055, "large": 0.085}  # shape radius as a fraction of the image side
POSITIONS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SPLITS = {"train": 0, "val": 1, "zeroshot": 2}
CAPTIONS_PER_IMAGE = 5
SYNTHETIC_SAMPLES_PER_SHARD = 1000
CAPTION_TEMPLATES = (
    "{n} {size} {colour} {shapes} at the {pos}",
    "a picture of {a} {size} {colour} {shapes} in the {pos} corner",
    "{n} {colour} {shapes}, {size}, {pos}",
    "there {be} {n} {size} {colour} {shapes} in the {pos}",
    "{size} {colour} {shapes} ({n}) at the {pos} of the image",
    "an image with {n} {colour} {shapes} that {be} {size}, placed at the {pos}",
    "{pos}: {n} {size} {colour} {shapes}",
    "{n} {shapes} in {colour}, {size}, at the {pos}",
)
CLASSNAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
ZEROSHOT_TEMPLATES = ("a photo of a {c}.", "a {c}.", "a drawing of a {c}.", "an image of a {c}.",
                      "a small {c}.", "a large {c}.", "a picture with a {c} in it.")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    count: int

    @property
    def label(self) -> int:
        return CLASSNAMES.index(f"{self.colour} {self.shape}")

    def caption(self, template: str) -> str:
        one = self.count == 1
        shapes = self.shape if one else PLURALS[self.shape]
        return template.format(n=COUNT_WORDS[self.count], a="a" if one else COUNT_WORDS[self.count],
                               size=self.size, colour=self.colour, shapes=shapes,
                               pos=self.position, be="is" if one else "are")


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(shape=SHAPES[rng.integers(len(SHAPES))],
                 colour=list(COLOURS)[rng.integers(len(COLOURS))],
                 size=list(SIZES)[rng.integers(len(SIZES))],
                 position=list(POSITIONS)[rng.integers(len(POSITIONS))],
                 count=int(rng.integers(1, 4)))


def draw_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Dark background; `count` non-overlapping shapes inside the named quadrant."""
    background = tuple(int(v) for v in rng.integers(0, 60) + rng.integers(0, 12, size=3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    jitter = rng.integers(-20, 21, size=3)
    colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[scene.colour], jitter))
    radius = max(2.0, SIZES[scene.size] * image_size)
    for cx, cy in _place(scene, image_size, radius, rng):
        _draw_shape(draw, scene.shape, cx, cy, radius, colour)
    return image


# Where 1, 2 or 3 shapes sit inside their quadrant (fractions of the quadrant side): fixed,
# non-overlapping arrangements plus a little jitter, rather than rejection sampling.
LAYOUTS = {
    1: (((0.5, 0.5),),),
    2: (((0.25, 0.5), (0.75, 0.5)), ((0.5, 0.25), (0.5, 0.75)), ((0.25, 0.25), (0.75, 0.75)),
        ((0.75, 0.25), (0.25, 0.75))),
    3: (((0.25, 0.25), (0.75, 0.25), (0.5, 0.75)), ((0.25, 0.75), (0.75, 0.75), (0.5, 0.25))),
}


def _place(scene: Scene, image_size: int, radius: float, rng) -> list[tuple[float, float]]:
    """Centres of the scene's shapes in image pixels."""
    half = image_size / 2
    qx, qy = POSITIONS[scene.position]
    layouts = LAYOUTS[scene.count]
    layout = layouts[rng.integers(len(layouts))]
    room = half / 2 - radius - 1 if scene.count == 1 else (0.22 * half - radius) / 2
    jitter = rng.uniform(-1, 1, size=(scene.count, 2)) * max(0.0, room)
    return [((qx + fx) * half + dx, (qy + fy) * half + dy)
            for (fx, fy), (dx, dy) in zip(layout, jitter)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                colour: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=colour)
    elif shape == "cross":
        t = 0.35 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)


@dataclass(frozen=True)
class SyntheticSource:
    """One split as a writer Source: item i is built from RNG (seed, split, i) alone."""

    split: str
    size: int
    image_size: int = 64
    seed: int = 0
    image_format: str = "jpg"

    def __len__(self) -> int:
        return self.size

    def describe(self, index: int) -> str:
        return f"{self.split}[{index}]"

    def sample(self, index: int) -> dict[str, bytes]:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        scene = random_scene(rng)
        image = draw_scene(scene, self.image_size, rng)
        order = rng.permutation(len(CAPTION_TEMPLATES))[:CAPTIONS_PER_IMAGE]
        captions = [scene.caption(CAPTION_TEMPLATES[t]) for t in order]
        meta = {"captions": captions, "source": "synthetic", "split": self.split, "index": index,
                "seed": self.seed, "shape": scene.shape, "colour": scene.colour,
                "size": scene.size, "position": scene.position, "count": scene.count,
                "label": scene.label, "classname": CLASSNAMES[scene.label],
                "width": self.image_size, "height": self.image_size}
        members = {self.image_format: encode_image(image, ImageOptions(format=self.image_format)),
                   "txt": captions[0].encode(), "json": json.dumps(meta).encode()}
        if self.split == "zeroshot":
            members["cls"] = str(scene.label).encode()
        return members


def write_synthetic(out_dir: Path, *, train: int = 10000, val: int = 1000, zeroshot: int = 1000,
                    image_size: int = 64, seed: int = 0, image_format: str = "jpg",
                    samples_per_shard: int = SYNTHETIC_SAMPLES_PER_SHARD, prefix: str = "shard", workers: int = 1,
                    progress: bool = True, overwrite: bool = False) -> dict[str, Path]:
    """Write train/, val/ and zeroshot/ under out_dir; return {split: folder}. Splits of size 0
    are not written. A rerun with the same arguments reuses finished shards."""
    if image_size < 16:
        raise DataError(f"--image-size must be at least 16, got {image_size}")
    if image_format not in FORMATS:
        raise DataError(f"--image-format must be one of {sorted(FORMATS)}, got {image_format!r}")
    ensure_writable_dir(out_dir)
    folders = {}
    for split, size in (("train", train), ("val", val), ("zeroshot", zeroshot)):
        if size < 0:
            raise DataError(f"--{split} must be >= 0, got {size}")
        if size == 0:
            continue
        source = SyntheticSource(split, size, image_size, seed, image_format)
        arguments = {"split": split, "size": size, "image_size": image_size, "seed": seed,
                     "image_format": image_format}
        folder = Path(out_dir) / split
        ShardSetWriter(folder, source="synthetic", arguments=arguments, prefix=prefix,
                       samples_per_shard=samples_per_shard, workers=workers, progress=progress,
                       overwrite=overwrite).write(source)
        if split == "zeroshot":
            write_label_files(folder, CLASSNAMES, ZEROSHOT_TEMPLATES)
        folders[split] = folder
    return folders


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "synthetic", help="write the embedded synthetic set (train/, val/, zeroshot/)",
        description="Coloured shapes whose captions describe them; deterministic by --seed.")
    parser.add_argument("out", type=Path, help="output folder (train/, val/, zeroshot/ inside)")
    parser.add_argument("--train", type=int, default=10000,
                        help="training samples (default: %(default)s)")
    parser.add_argument("--val", type=int, default=1000,
                        help="retrieval samples, 5 captions each (default: %(default)s)")
    parser.add_argument("--zeroshot", type=int, default=1000,
                        help="labelled samples (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=64,
                        help="image side in pixels (default: %(default)s)")
    parser.add_argument("--image-format", choices=sorted(FORMATS), default="jpg",
                        help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    add_writer_arguments(parser)
    # 10 train shards by default: enough for exact epochs on several ranks and workers
    parser.set_defaults(func=run, samples_per_shard=SYNTHETIC_SAMPLES_PER_SHARD)


def run(args: argparse.Namespace) -> int:
    folders = write_synthetic(args.out, train=args.train, val=args.val, zeroshot=args.zeroshot,
                              image_size=args.image_size, seed=args.seed,
                              image_format=args.image_format,
                              samples_per_shard=args.samples_per_shard, prefix=args.prefix,
                              workers=args.workers, progress=args.progress,
                              overwrite=args.overwrite)
    for split, folder in folders.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        print(f"{split}: {manifest['written']} samples in {len(manifest['shards'])} shards -> "
              f"{folder}")
    return 0
