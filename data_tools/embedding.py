"""The work of `clip-data embed` (data_tools/embed.py): teachers run on stored crops, and the
sidecar shards they fill (format: training/data/sidecar.py). Imported only when embedding, so
the other subcommands start without torch."""
from __future__ import annotations

import os
import random
import tarfile
from collections import Counter
from pathlib import Path

import torch

from data_tools import embed
from data_tools.errors import DataError
from data_tools.shards import ShardRecord, add_member, commit_shard
from training.data.samples import SampleAccount, check_sample, decode_image, read_shard
from training.data.sidecar import DTYPES, FORMAT, encode_array
from training.data.views import CROP_RATIO, CROP_SCALE, PairedViews, ViewSpec, crop_box

# embed.py names these without importing torch; they must be the reader's.
assert (embed.DTYPES, embed.FORMAT) == (DTYPES, FORMAT)
assert embed.CROP == {"scale": list(CROP_SCALE), "ratio": list(CROP_RATIO)}


class Teacher:
    """One teacher as embed runs it: the built model, its identity and its view of a crop."""

    def __init__(self, model: str, pretrained: str | None, precision: str, device: torch.device):
        from training import models
        from training.specs import build_teacher
        from training.teachers import teacher_identity
        try:
            self.identity = teacher_identity(model, pretrained)
            self.model, self.spec = build_teacher(model, pretrained, precision, device)
        except (ValueError, OSError) as err:
            raise DataError(f"--teacher {model}: {err}") from None
        self.encode = models.encode
        self.views = PairedViews(ViewSpec.from_preprocess(self.spec.preprocess_cfg, model))
        self.device = device
        with torch.no_grad():  # the scale the live teacher's outputs carry
            probe = self.encode(self.model, None, self.spec.tokenizer(["a"]).to(device))
        self.identity.update(logit_scale=float(probe["logit_scale"]), precision=precision,
                             tokenizer=self.spec.tokenizer.identity)

    @torch.no_grad()
    def embed(self, images: list, boxes: list[list[tuple]], captions: list[list[str]]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image embeddings of every (image, box) and text embeddings of every caption, in order."""
        crops = torch.stack([self.views.crop_at(image, box)
                             for image, sample_boxes in zip(images, boxes) for box in sample_boxes])
        pixels = self.views.batch_views(crops)[0].to(self.device)
        ids = self.spec.tokenizer([c for sample in captions for c in sample]).to(self.device)
        out = self.encode(self.model, pixels, ids)
        return out["image_features"].float().cpu(), out["text_features"].float().cpu()


# --------------------------------------------------------------------------- one shard

class ShardEmbedder:
    """Writes the sidecar shards of one plan (see the module doc)."""

    def __init__(self, out_dir: Path, teachers: list[Teacher], *, augmentations: int, dtype: str,
                 seed: int, batch_size: int, fingerprint: str):
        self.out_dir, self.teachers = out_dir, teachers
        self.augmentations, self.dtype, self.seed = augmentations, dtype, seed
        self.batch_size, self.fingerprint = batch_size, fingerprint

    def write(self, shard: Path, progress) -> ShardRecord:
        final = self.out_dir / shard.name
        partial = self.out_dir / f".{shard.name}.partial"
        account, skipped, count, pending = SampleAccount(), Counter(), 0, []
        try:
            with open(partial, "wb") as f:
                with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
                    for raw in read_shard(str(shard), account):
                        item = self._prepare(shard.name, raw)
                        if isinstance(item, str):
                            skipped[item] += 1
                            continue
                        pending.append(item)
                        if len(pending) * self.augmentations >= self.batch_size:
                            count += self._write_chunk(tar, pending, progress)
                            pending = []
                    if pending:
                        count += self._write_chunk(tar, pending, progress)
                f.flush()
                os.fsync(f.fileno())
            if account.shard_errors:
                raise DataError(f"{shard}: cannot be read to its end (truncated or not a tar)")
            return commit_shard(partial, final, self.fingerprint, count=count,
                                skipped=dict(sorted(skipped.items())))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def _prepare(self, shard_name: str, raw: dict):
        """(key, image, crop boxes, captions), or why the sample is skipped (training skips it
        too: samples.check_sample, an image that does not decode)."""
        sample = check_sample(raw)
        if isinstance(sample, str):
            return sample
        try:
            image = decode_image(sample)
        except (OSError, ValueError):
            return "undecodable_image"
        rng = random.Random(f"embed:{self.seed}:{shard_name}:{sample.key}")
        boxes = [crop_box(image.width, image.height, rng) for _ in range(self.augmentations)]
        return sample.key, image, boxes, sample.captions

    def _write_chunk(self, tar: tarfile.TarFile, items: list[tuple], progress) -> int:
        keys, images, boxes, captions = zip(*items)
        outputs = [teacher.embed(images, boxes, captions) for teacher in self.teachers]
        n, row = self.augmentations, 0
        for i, key in enumerate(keys):
            members = {"crops.npy": encode_array(torch.tensor(boxes[i], dtype=torch.int32), "crops")}
            c = len(captions[i])
            start = sum(len(cs) for cs in captions[:i])
            for t, (image_features, text_features) in enumerate(outputs):
                members[f"img{t}.npy"] = encode_array(image_features[row:row + n], self.dtype)
                members[f"txt{t}.npy"] = encode_array(text_features[start:start + c], self.dtype)
            row += n
            for ext in sorted(members):
                add_member(tar, f"{key}.{ext}", members[ext])
        progress(len(keys))
        return len(keys)
