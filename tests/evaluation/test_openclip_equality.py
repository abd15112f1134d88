"""Our zero-shot and retrieval numbers equal OpenCLIP's own code on the same model and data.

The peer path reads the shards with a plain webdataset pipeline and calls the model directly,
so our reader, encoder, classifier and metrics are all checked against an independent route.
"""
from types import SimpleNamespace

import open_clip
import pytest
import torch
import webdataset as wds
from open_clip_train import zero_shot as oc_zero_shot
from open_clip_train.train import get_clip_metrics

from tests.helpers.evaluation import TEMPLATES as OUR_TEMPLATES
from training.evaluation.suite import eval_transform, run_retrieval, run_zeroshot
from training.evaluation.zeroshot import build_classifier


TEMPLATES = [t.replace("{c}", "{}") for t in OUR_TEMPLATES]   # open_clip's format() style


def peer_samples(folder, *fields):
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil")
                .to_tuple(*fields))


def test_classifier_equals_open_clip_build_zero_shot_classifier(model, spec):
    names = ["red", "green", "blue", "a very long class name with several words"]
    tokenizer = spec.tokenizer
    ours = build_classifier(model, tokenizer, names, OUR_TEMPLATES)
    theirs = open_clip.build_zero_shot_classifier(model, tokenizer, names, TEMPLATES,
                                                  num_classes_per_batch=3)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # callables (open_clip's 80 OpenAI templates) work as well as format strings
    openai = list(open_clip.OPENAI_IMAGENET_TEMPLATES[:4])
    torch.testing.assert_close(build_classifier(model, tokenizer, names, openai),
                               open_clip.build_zero_shot_classifier(model, tokenizer, names, openai),
                               rtol=1e-5, atol=1e-6)


def _accuracy_numpy2(output, target, topk=(1,)):
    """open_clip_train.zero_shot.accuracy with `.item()`: the original calls float() on a
    1-element 1-d array, which numpy 2.4 refuses. Same counting otherwise."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() for k in topk]


@pytest.mark.parametrize("batch_size", [5, 64])
def test_zeroshot_accuracy_equals_open_clip_train_zero_shot_run(model, spec, eval_sets,
                                                                batch_size, monkeypatch):
    monkeypatch.setattr(oc_zero_shot, "accuracy", _accuracy_numpy2)
    transform, tokenizer = eval_transform(spec.preprocess_cfg), spec.tokenizer
    ours = run_zeroshot(model, eval_sets["zeroshot"], tokenizer=tokenizer, transform=transform,
                        batch_size=batch_size)

    samples = peer_samples(eval_sets["zeroshot"], "png", "cls")
    names = (eval_sets["zeroshot"] / "classnames.txt").read_text().split()
    classifier = open_clip.build_zero_shot_classifier(model, tokenizer, names, TEMPLATES)
    loader = torch.utils.data.DataLoader(
        [(transform(img), int(label)) for img, label in samples], batch_size=batch_size)
    args = SimpleNamespace(device="cpu", precision="fp32", batch_size=batch_size)
    top1, top5 = oc_zero_shot.run(model, classifier, loader, args)

    assert ours["num_images"] == len(samples) == 28
    assert ours["top1"] == pytest.approx(top1)
    assert ours["top5"] == pytest.approx(top5)
    assert 0 < ours["top5"] < 1          # not a degenerate case


def test_retrieval_equals_open_clip_get_clip_metrics(model, spec, eval_sets):
    transform, tokenizer = eval_transform(spec.preprocess_cfg), spec.tokenizer
    ours = run_retrieval(model, eval_sets["val1"], tokenizer=tokenizer, transform=transform,
                         batch_size=7)

    samples = peer_samples(eval_sets["val1"], "png", "txt")
    with torch.no_grad():
        out = model(torch.stack([transform(img) for img, _ in samples]),
                    tokenizer([txt for _, txt in samples]))
    image_features, text_features = (out["image_features"], out["text_features"]) \
        if isinstance(out, dict) else out[:2]
    theirs = get_clip_metrics(image_features, text_features, model.logit_scale.exp())
    assert ours["num_images"] == ours["num_texts"] == len(samples) == 24
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(float(value), abs=1e-9), key


def test_eval_transform_equals_open_clip_preprocess_val(spec):
    """The spec's preprocess_cfg gives open_clip's own eval transform (create_model_and_transforms),
    and every key of a non-default config is honoured (open_clip.image_transform with them)."""
    from PIL import Image
    rng = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (50, 83, 3), generator=rng,
                                          dtype=torch.uint8).numpy())   # not square: crop matters
    _, _, preprocess_val = open_clip.create_model_and_transforms("Tiny-ViT-Student")
    torch.testing.assert_close(eval_transform(spec.preprocess_cfg)(image), preprocess_val(image),
                               rtol=0, atol=0)
    other = {"size": 40, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
             "interpolation": "bilinear", "resize_mode": "longest", "fill_color": 7}
    theirs = open_clip.image_transform(40, is_train=False, mean=(0.5,) * 3, std=(0.25,) * 3,
                                       interpolation="bilinear", resize_mode="longest",
                                       fill_color=7)
    ours = eval_transform(other)(image)
    torch.testing.assert_close(ours, theirs(image), rtol=0, atol=0)
    assert not torch.equal(ours, eval_transform({**other, "resize_mode": "shortest"})(image))
