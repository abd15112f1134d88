"""The embedded synthetic set: deterministic by seed, captions that are true of the pixels,
the three split layouts, and learnability by a tiny CLIP in a plain contrastive loop."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main
from data_tools.synthetic import CLASSNAMES, COLOURS, COUNT_WORDS, ZEROSHOT_TEMPLATES
from tests.helpers.shards import make_synthetic_shards


def read_samples(folder):
    """{key: {ext: bytes}} from every shard of a set, in shard order."""
    samples = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("synthetic"), train=200, val=40,
                                 zeroshot=60, samples_per_shard=64)


def test_layout_counts_and_helper_paths(synthetic):
    assert (synthetic["train_count"], synthetic["val_count"], synthetic["zeroshot_count"]) == \
        (200, 40, 60)
    assert synthetic["train_shards"].endswith("train/shard-{000000..000003}.tar")
    for split in ("train", "val", "zeroshot"):
        manifest = json.loads((synthetic[split] / "manifest.json").read_text())
        assert manifest["source"] == "synthetic" and manifest["skipped"] == {}
        assert manifest["arguments"]["split"] == split
    zeroshot = synthetic["zeroshot"]
    assert (zeroshot / "classnames.txt").read_text().splitlines() == CLASSNAMES
    assert (zeroshot / "zeroshot_classification_templates.txt").read_text().splitlines() == \
        list(ZEROSHOT_TEMPLATES)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, synthetic):
    again = make_synthetic_shards(tmp_path / "again", train=200, val=40, zeroshot=60,
                                  samples_per_shard=64)
    other = make_synthetic_shards(tmp_path / "other", train=200, val=0, zeroshot=0,
                                  samples_per_shard=64, seed=1)
    for split in ("train", "val", "zeroshot"):
        for shard in synthetic[split].glob("*.tar"):
            assert shard.read_bytes() == (again[split] / shard.name).read_bytes()
    assert "val" not in other
    first = read_samples(synthetic["train"])["000000000"]
    assert first["jpg"] != read_samples(other["train"])["000000000"]["jpg"]


def describe_pixels(jpg: bytes):
    """What the image shows, measured from the pixels: the colour whose reference RGB is closest
    to the mean of the saturated pixels, the quadrant they sit in, and the number of blobs."""
    from scipy import ndimage

    pixels = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=float)
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 80
    mean = pixels[saturated].mean(axis=0)
    colour = min(COLOURS, key=lambda c: np.linalg.norm(mean - np.array(COLOURS[c])))
    ys, xs = np.nonzero(saturated)
    half = pixels.shape[0] / 2
    vertical = "top" if ys.mean() < half else "bottom"
    position = f"{vertical} {'left' if xs.mean() < half else 'right'}"
    blobs = ndimage.label(ndimage.binary_opening(saturated))[1]
    return colour, position, blobs


def test_captions_are_true_of_the_pixels(synthetic):
    samples = read_samples(synthetic["val"])
    assert len(samples) == 40
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        colour, position, blobs = describe_pixels(sample["jpg"])
        assert (colour, position) == (meta["colour"], meta["position"]), key
        assert blobs == meta["count"], key
        captions = meta["captions"]
        assert len(captions) == len(set(captions)) == 5
        assert sample["txt"].decode() == captions[0]
        for caption in captions:
            for word in (meta["colour"], meta["shape"], meta["position"],
                         COUNT_WORDS[meta["count"]] if meta["count"] > 1 else ""):
                assert word in caption, (caption, meta)


def test_zeroshot_labels_name_colour_and_shape(synthetic):
    samples = read_samples(synthetic["zeroshot"])
    labels = set()
    for sample in samples.values():
        meta = json.loads(sample["json"])
        label = int(sample["cls"].decode())
        assert CLASSNAMES[label] == f"{meta['colour']} {meta['shape']}"
        labels.add(label)
    assert len(labels) > 15  # 60 samples cover most of the 24 classes


def test_cli_synthetic_writes_the_three_sets(tmp_path, capsys):
    assert main(["synthetic", str(tmp_path), "--train", "30", "--val", "10", "--zeroshot", "5",
                 "--samples-per-shard", "16", "--image-size", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train: 30 samples in 2 shards" in out and "zeroshot: 5 samples in 1 shards" in out
    image = Image.open(io.BytesIO(read_samples(tmp_path / "train")["000000000"]["jpg"]))
    assert image.size == (32, 32)
    assert main(["synthetic", str(tmp_path), "--image-size", "8"]) == 2
    assert "--image-size must be at least 16" in capsys.readouterr().err


def load_pairs(folder, preprocess_mean, preprocess_std):
    """Images as a normalised float tensor and the json metadata, in key order."""
    import torch

    samples = read_samples(folder)
    images = np.stack([np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
                       for s in samples.values()]).astype(np.float32) / 255.0
    mean, std = np.array(preprocess_mean, np.float32), np.array(preprocess_std, np.float32)
    pixels = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())
    return pixels, [json.loads(s["json"]) for s in samples.values()]


def recall_at_k(similarity, positives, k):
    """Share of rows with at least one positive column among their top k."""
    top = similarity.topk(k, dim=1).indices
    return positives.gather(1, top).any(dim=1).float().mean().item()


@pytest.mark.slow
def test_a_tiny_clip_learns_the_synthetic_set(tmp_path):
    """The set is learnable: Tiny-ViT-Student trained from scratch with a plain contrastive loss
    for 120 steps reaches val retrieval R@5 far above chance (about 2.5% here)."""
    import open_clip
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    open_clip.add_model_config("configs/models")
    model = open_clip.create_model("Tiny-ViT-Student", output_dict=True)
    tokenizer = open_clip.get_tokenizer("Tiny-ViT-Student")
    paths = make_synthetic_shards(tmp_path, train=2000, val=200, zeroshot=0,
                                  samples_per_shard=1000)
    mean, std = model.visual.image_mean, model.visual.image_std
    train_images, train_meta = load_pairs(paths["train"], mean, std)
    train_tokens = tokenizer([m["captions"][0] for m in train_meta])
    all_train_tokens = tokenizer([c for m in train_meta for c in m["captions"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    steps, batch = 120, 64
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        index = torch.randint(0, len(train_meta), (batch,), generator=generator)
        caption = torch.randint(0, 5, (batch,), generator=generator)  # one of the 5 captions
        out = model(train_images[index], all_train_tokens[index * 5 + caption])
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        labels = torch.arange(batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()

    model.eval()
    val_images, val_meta = load_pairs(paths["val"], mean, std)
    captions = [c for m in val_meta for c in m["captions"]]
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(val_images), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    similarity = image_features @ text_features.T                  # [200, 1000]
    positives = torch.arange(len(captions))[None, :] // 5 == torch.arange(len(val_meta))[:, None]
    image_to_text = recall_at_k(similarity, positives, 5)
    text_to_image = recall_at_k(similarity.T, positives.T, 5)
    chance = 5 / len(val_meta)
    print(f"loss {loss.item():.3f} R@5 image->text {image_to_text:.3f} "
          f"text->image {text_to_image:.3f} (chance {chance:.3f})")
    assert image_to_text > 6 * chance and text_to_image > 6 * chance
