"""`clip-eval latency`: one row per backend with the model's cost and consistent timings
(never a timed assertion: speed is in docs/deploy.md)."""
import json

import pytest

from training.evaluation.cli import main


@pytest.mark.slow
def test_latency_rows_per_backend(exported, tmp_path, capsys):
    out = tmp_path / "latency.json"
    assert main(["latency", "--checkpoint", str(exported / "openclip"), "--iters", "1",
                 "--warmup", "0", "--batch-size", "4", "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["backend"] for r in rows] == ["pytorch", "onnx", "int8"]
    card = json.loads((exported / "card.json").read_text())
    for row in rows:
        assert row["image_params"] == card["cost"]["image_params"]
        assert row["text_macs"] == card["cost"]["text_macs"]
        assert row["batch_size"] == 4 and row["threads"] == 1
        assert row["pairs_per_s"] == pytest.approx(
            1 / (1 / row["images_per_s"] + 1 / row["texts_per_s"]))
        assert row["image_ms_b1"] > 0 and row["text_ms_b1"] > 0
    table = out.with_suffix(".md").read_text().splitlines()
    assert len(table) == 2 + 3 and "ONNX Runtime int8" in table[-1]


def test_latency_bad_backend(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["latency", "--model", "Tiny-ViT-Student", "--backends", "pytorch,tensorrt"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--backends 'pytorch,tensorrt'" in err
