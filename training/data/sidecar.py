"""Teacher embeddings stored beside the shards (`clip-data embed`): the sidecar format and its reader.

An embedding set NAME of the shards in folder D is the folder D/NAME/ holding, for each image
shard D/X.tar, a sidecar shard D/NAME/X.tar with the same keys, plus manifest.json and sizes.json.
Per sample KEY (docs/data.md):

    KEY.crops.npy   int32 [N, 4]   the N stored augmentations: crop boxes (top, left, height,
                                   width) in the decoded image's pixels (views.crop_box)
    KEY.img{T}.npy  [N, D_T]       teacher T's image embedding of each augmentation
    KEY.txt{T}.npy  [C, D_T]       teacher T's text embedding of each caption (samples.py's
                                   caption list, in its order)

stored as float32 / float16, or bf16 as the upper 16 bits of float32 (uint16 arrays). The
manifest's "embeddings" entry names the teachers (identity: model, config hash, weights hash,
preprocessing, width, logit scale), N, the dtype, the seed, and per sidecar shard its sha256 and
the size of the image shard it was computed from.

`EmbeddingSets(name)` maps image-shard URLs to their sidecars; `check(urls, teachers)` refuses (one
line) a set that lacks shards or names other teachers, and `SidecarJoin` adds each sample's
stored arrays to it while the loader reads, refusing a sidecar shard whose bytes changed before
any of its samples is used.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import posixpath
import tarfile

import numpy as np
import torch

from .sources import DataError, read_json

FORMAT = 1
MANIFEST = "manifest.json"
DTYPES = ("fp32", "fp16", "bf16")
# The identity entries a run compares with the teachers its config names (logit_scale is the
# teacher's own, recorded for the run to use; it is not something the config names).
IDENTITY_KEYS = ("model", "config_sha256", "pretrained", "weights_sha256", "preprocess",
                 "embed_dim")


# --------------------------------------------------------------------------- arrays <-> members

def encode_array(values: torch.Tensor | np.ndarray, dtype: str) -> bytes:
    """One member's bytes (.npy) in the set's dtype."""
    tensor = torch.as_tensor(values)
    if dtype == "bf16":
        array = tensor.float().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    elif dtype == "fp16":
        array = tensor.float().to(torch.float16).numpy()
    elif dtype == "fp32":
        array = tensor.float().numpy()
    else:  # crops
        array = tensor.numpy()
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_array(data: bytes, dtype: str | None = None) -> torch.Tensor:
    """A member's array as a tensor (bf16 members come back as bfloat16)."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if dtype == "bf16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def member_names(num_teachers: int) -> tuple[str, ...]:
    return ("crops.npy",) + tuple(f"{kind}{t}.npy" for t in range(num_teachers)
                                  for kind in ("img", "txt"))


# --------------------------------------------------------------------------- the set

def sidecar_url(url: str, name: str) -> str:
    folder, base = posixpath.split(url)
    return posixpath.join(folder, name, base)


class EmbeddingSets:
    """The embedding set `name` beside every shard folder (picklable: loader workers hold it)."""

    def __init__(self, name: str):
        self.name = name
        self._manifests: dict[str, dict] = {}
        self._records: dict[str, dict[str, dict]] = {}  # folder -> shard name -> record

    def manifest(self, url: str) -> dict:
        folder = posixpath.join(posixpath.dirname(url), self.name)
        if folder not in self._manifests:
            manifest = read_json(posixpath.join(folder, MANIFEST))
            info = (manifest or {}).get("embeddings")
            if not info or info.get("format") != FORMAT:
                raise DataError(f"{folder}: no embedding set (manifest.json with embeddings "
                                f"format {FORMAT}); run clip-data embed --name {self.name} on "
                                f"{posixpath.dirname(url) or '.'}")
            self._manifests[folder] = manifest
            self._records[folder] = {record["name"]: record for record in manifest["shards"]}
        return self._manifests[folder]

    def info(self, url: str) -> dict:
        return self.manifest(url)["embeddings"]

    def record(self, url: str) -> dict:
        """The sidecar shard's manifest record; DataError when the set lacks this shard."""
        self.manifest(url)
        record = self._records[posixpath.join(posixpath.dirname(url), self.name)].get(
            posixpath.basename(url))
        if record is not None:
            return record
        raise DataError(f"shard {url} has no stored embeddings in {sidecar_url(url, self.name)} "
                        f"(not in that set's manifest.json)")

    def check(self, urls: list[str], teachers: list[dict]) -> dict:
        """Before training: every shard has its sidecar (listed, same size, image shard of the
        recorded size), and each set names exactly `teachers` (identities as teacher_identity
        makes them, in order). Returns the first set's embeddings info."""
        first = None
        for url in urls:
            if url.startswith("pipe:") or "://" in url:
                raise DataError(f"model.teacher_embeddings: stored embeddings need local shards, "
                                f"got {url}")
            info = self.info(url)
            if first is None:
                first = info
                self._check_teachers(url, info, teachers)
            elif info["teachers"] != first["teachers"] or info["augmentations"] != first["augmentations"]:
                raise DataError(f"{sidecar_url(url, self.name)}: its set's teachers or augmentations "
                                f"differ from those of the other shard folders")
            record = self.record(url)
            path = sidecar_url(url, self.name)
            size = _size(path)
            if size != record["bytes"]:
                raise DataError(f"{path}: {'missing' if size is None else f'{size} bytes'}, its "
                                f"manifest says {record['bytes']}: rerun clip-data embed")
            expected = info["source_bytes"].get(posixpath.basename(url))
            if expected != _size(url):
                raise DataError(f"{url}: {_size(url)} bytes, but its embeddings in {path} were "
                                f"computed from a {expected}-byte shard: rerun clip-data embed")
        return first

    def _check_teachers(self, url: str, info: dict, teachers: list[dict]) -> None:
        where = posixpath.join(posixpath.dirname(sidecar_url(url, self.name)), MANIFEST)
        stored = info["teachers"]
        if len(stored) != len(teachers):
            raise DataError(f"{where}: holds {len(stored)} teacher(s), the config names "
                            f"{len(teachers)} (model.teacher + model.ensemble)")
        for t, (have, want) in enumerate(zip(stored, teachers)):
            for key in IDENTITY_KEYS:
                if have.get(key) != want.get(key):
                    raise DataError(f"{where}: teacher {t} {key} is {_short(have.get(key))}, the "
                                    f"config names {_short(want.get(key))} ({want['model']})")


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- the join

class SidecarJoin:
    """Stored arrays for the samples of the shards being read: the last used sidecar shards
    stay in memory, twice as many as the image shards the loader reads side by side
    (`side_by_side`, plan.EpochPlan.shards_side_by_side: an exact epoch's global order reads a
    few lanes, each through a shuffle window that may span several shards). Twice: the shards
    of the lanes' current windows and of the windows before them, which all lanes leave at the
    same step; a shard still needed was used in one of those two, so least-recently-used
    eviction only drops shards no sample will ask for again, and no sidecar is read twice.

    `lookup(url, key)` -> {member name: bytes} or None when that sample has no entry (embed
    skipped it: an image that does not decode, which the loader skips too). The sidecar shard
    is read whole and its sha256 compared with the manifest before any entry is returned.
    """

    def __init__(self, sets: EmbeddingSets, side_by_side: int):
        self.sets, self.cached = sets, 2 * max(side_by_side, 1)
        self._shards: collections.OrderedDict[str, dict] = collections.OrderedDict()

    def lookup(self, url: str, key: str) -> dict[str, bytes] | None:
        if url not in self._shards:
            self._shards[url] = self._load(url)
            if len(self._shards) > self.cached:
                self._shards.popitem(last=False)
        self._shards.move_to_end(url)
        return self._shards[url].get(key)

    def _load(self, url: str) -> dict[str, dict[str, bytes]]:
        record = self.sets.record(url)
        path = sidecar_url(url, self.sets.name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exn:
            raise DataError(f"{path}: cannot read stored embeddings: {exn.strerror or exn}") from None
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise DataError(f"{path}: sha256 differs from its manifest.json (changed after clip-data "
                            f"embed wrote it): rerun clip-data embed")
        entries: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                entries.setdefault(key, {})[ext] = tar.extractfile(member).read()
        return entries


def pick(stored: dict[str, bytes], num_captions: int, dtype: str, num_teachers: int,
         augmentation: int, captions: list[int], where: str
         ) -> tuple[tuple[int, int, int, int], list, list]:
    """(crop box, [image embedding per teacher], [text embeddings [K, D] per teacher]) of one
    sample's chosen augmentation and captions (in that order); DataError when the entry does not
    fit the sample."""
    try:
        crops = decode_array(stored["crops.npy"])
        images = [decode_array(stored[f"img{t}.npy"], dtype) for t in range(num_teachers)]
        texts = [decode_array(stored[f"txt{t}.npy"], dtype) for t in range(num_teachers)]
    except (KeyError, ValueError) as exn:
        raise DataError(f"{where}: malformed stored embeddings ({exn})") from None
    if any(t.shape[0] != num_captions for t in texts):
        raise DataError(f"{where}: stored text embeddings for {texts[0].shape[0]} captions, the "
                        f"sample has {num_captions}")
    box = tuple(int(v) for v in crops[augmentation])
    return box, [i[augmentation] for i in images], [t[list(captions)] for t in texts]
