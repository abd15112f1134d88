"""The run report renders from a real run's metrics.jsonl (one run, or several side by side)
and tolerates missing keys and unreadable lines."""
import shutil

import matplotlib.image
import pytest

from training.evaluation.cli import main
from training.evaluation.report import read_metrics, runs_table, write_report


@pytest.mark.slow
def test_report_from_a_real_run(trained_run, tmp_path):
    run_dir = trained_run["run_dir"]
    # a second "run": the first half of the same log, a line cut mid-write, no eval lines
    partial = tmp_path / "partial"
    partial.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    train_lines = [line for line in lines if '"eval/' not in line][:2]
    (partial / "metrics.jsonl").write_text("\n".join(train_lines) + '\n{"step": 6, "lo')

    out = tmp_path / "report"
    assert main(["report", str(run_dir), str(partial), "--out", str(out),
                 "--labels", "full", "partial"]) == 0
    for png in ("training.png", "eval.png"):
        pixels = matplotlib.image.imread(out / png)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 800
        assert pixels.std() > 0.05                      # not a blank canvas
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| run | last step | zeroshot/top1 (%)")
    full = read_metrics(run_dir)
    expected_top1 = f"{100 * full.last('eval/zeroshot/top1'):.1f}"
    assert table[2].startswith(f"| full | 8 | {expected_top1} |")
    assert table[3].startswith("| partial | 4 | - |")
    report = (out / "report.md").read_text()
    assert "![training](training.png)" in report and "![eval](eval.png)" in report
    assert "partial: 1 unreadable metrics.jsonl lines skipped" in report


def test_report_tolerates_missing_keys(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "lr": 0.1, "loss": "nan?"}\n'
        '{"no_step": 1}\n{"step": 3, "eval/val/image_to_text_R@1": 0.5}\n')
    run = read_metrics(tmp_path)
    assert run.series["loss"] == ([1], [2.0]) and run.bad_lines == 1
    written = write_report([tmp_path], tmp_path / "out")
    assert set(written) == {"training", "eval", "table", "report"}
    assert "| 50.0 |" in runs_table([run])


def test_report_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing: no metrics.jsonl" in err
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
