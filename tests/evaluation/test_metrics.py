"""Zero-shot and retrieval metrics on hand-built embeddings whose answers are known, and
equality with open_clip_train's get_clip_metrics (one caption per image)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip_train.train import get_clip_metrics

from training.evaluation.retrieval import retrieval_metrics, retrieval_ranks
from training.evaluation.zeroshot import zeroshot_metrics


def one_hot(indices, dim):
    return F.one_hot(torch.tensor(indices), dim).float()


def test_zeroshot_known_answers():
    # 3 classes on the axes; images point at a class, or between two with a known preference.
    classifier = torch.eye(3)                                  # [D=3, C=3]
    images = F.normalize(torch.tensor([
        [1.0, 0.0, 0.0],    # label 0, predicted 0
        [0.0, 1.0, 0.0],    # label 1, predicted 1
        [0.9, 0.5, 0.0],    # label 1, predicted 0 then 1 (top-2 hit)
        [0.0, 0.3, 1.0],    # label 2, predicted 2
        [0.0, 1.0, 0.2],    # label 2, predicted 1, then 2
    ]), dim=1)
    labels = torch.tensor([0, 1, 1, 2, 2])
    m = zeroshot_metrics(images, labels, classifier, ks=(1, 2))
    assert m["top1"] == pytest.approx(3 / 5)
    assert m["top2"] == pytest.approx(1.0)
    # per class top-1 recall: class 0 1/1, class 1 1/2, class 2 1/2 -> mean 2/3
    assert m["mean_per_class_recall"] == pytest.approx(2 / 3)
    assert m["num_images"] == 5 and m["num_classes"] == 3


def test_zeroshot_top5_capped_by_class_count_and_bad_labels():
    m = zeroshot_metrics(torch.eye(2), torch.tensor([1, 0]), torch.eye(2))
    assert m["top1"] == 0.0 and m["top5"] == 1.0
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        zeroshot_metrics(torch.eye(2), torch.tensor([0, 2]), torch.eye(2))


def test_retrieval_several_captions_known_ranks():
    # 3 images on the axes of R^4; captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2.
    images = torch.eye(4)[:3]
    texts = F.normalize(torch.tensor([
        [0.1, 1.0, 0.0, 0.0],   # of image 0, but closest to image 1  (t2i rank 1)
        [0.8, 0.0, 0.6, 0.0],   # of image 0, closest to it           (t2i rank 0)
        [0.0, 0.2, 0.0, 1.0],   # of image 1; image 1 is its best     (t2i rank 0)
        [0.0, 0.0, 0.9, 0.1],   # of image 1, closest to image 2      (t2i rank 1)
        [0.6, 0.0, 0.5, 0.0],   # of image 2, image 0 beats it        (t2i rank 1)
    ]), dim=1)
    text_to_image = torch.tensor([0, 0, 1, 1, 2])
    i2t, t2i = retrieval_ranks(images, texts, text_to_image)
    assert t2i.tolist() == [1, 0, 0, 1, 1]
    # image 0: best positive text 1 (0.80); text 4 (0.77) is below -> rank 0.
    # image 1: positives texts 2, 3 (0.196, 0); text 0 scores 0.995 -> rank 1.
    # image 2: positive text 4 (0.64); text 3 (0.994) above, text 1 (0.60) below -> rank 1.
    assert i2t.tolist() == [0, 1, 1]
    m = retrieval_metrics(images, texts, text_to_image)
    assert m["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert m["image_to_text_R@5"] == 1.0
    assert m["text_to_image_R@1"] == pytest.approx(2 / 5)
    assert m["image_to_text_median_rank"] == 2.0
    assert m["image_to_text_mean_rank"] == pytest.approx(1 + 2 / 3)
    assert m["text_to_image_median_rank"] == 2.0
    assert m["text_to_image_mean_rank"] == pytest.approx(1 + 3 / 5)
    assert (m["num_images"], m["num_texts"]) == (3, 5)


def test_retrieval_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval_ranks(torch.eye(2), torch.eye(2)[:1], torch.tensor([0]))


@pytest.mark.parametrize("n", [7, 64, 1500])   # 1500 spans two similarity chunks
def test_retrieval_equals_open_clip_get_clip_metrics_single_caption(n):
    gen = torch.Generator().manual_seed(n)
    images = F.normalize(torch.randn(n, 16, generator=gen), dim=1)
    texts = F.normalize(images + 0.9 * torch.randn(n, 16, generator=gen), dim=1)
    ours = retrieval_metrics(images, texts, torch.arange(n))
    theirs = get_clip_metrics(images, texts, logit_scale=torch.tensor(100.0))
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(float(value), abs=1e-12), key
    assert 0 < ours["image_to_text_R@1"] < 1   # the case is not degenerate


def test_retrieval_many_captions_equals_brute_force_argsort():
    """Any-positive-in-top-k via counts equals a sort-based computation done per query."""
    gen = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(40, 8, generator=gen), dim=1)
    text_to_image = torch.arange(40).repeat_interleave(5)
    texts = F.normalize(images[text_to_image] + torch.randn(200, 8, generator=gen), dim=1)
    i2t, t2i = retrieval_ranks(images, texts, text_to_image, chunk=7)
    sim = (images @ texts.T).numpy()
    for i in range(40):
        order = np.argsort(-sim[i])
        assert i2t[i] == min(np.where(text_to_image.numpy()[order] == i)[0])
    for t in range(200):
        order = np.argsort(-sim[:, t])
        assert t2i[t] == np.where(order == int(text_to_image[t]))[0][0]
