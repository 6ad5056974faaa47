"""The report of a run or sweep (analysis/report.py): run labels, and a report of fake runs.

opd-report itself, on a real sweep, is in tests/commands/test_report.py.
"""

import json

import pytest

from opd_cli.analysis.report import labels, write_report


def fake_run(path, overrides, steps=3):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra/overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    rows = [{"step": 0, "eval/acc": 0.1}] + [{"step": s, "loss": 1.0 / s, "entropy": 0.5} for s in range(1, steps)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_labels_are_the_overrides_that_differ(tmp_path):
    a = fake_run(tmp_path / "0", ["loss.k=1", "logger=none", "paths.models=/x"])
    b = fake_run(tmp_path / "1", ["loss.k=4", "logger=none", "paths.models=/x"])
    assert labels([a, b]) == ["loss.k=1", "loss.k=4"]
    assert labels([a]) == ["0"]  # a single run: nothing differs, its directory names it


def test_report_of_fake_runs(tmp_path):
    fake_run(tmp_path / "0", ["loss.k=1"])
    fake_run(tmp_path / "1", ["loss.k=4"])
    report = write_report(tmp_path)
    text = report.read_text()
    assert "| loss.k=1 | 2 |" in text and "| loss.k=4 | 2 |" in text
    assert (tmp_path / "report/loss.png").exists() and (tmp_path / "report/eval_acc.png").exists()
    assert not (tmp_path / "report/grad_norm.png").exists()  # no run logged it: no empty plot


@pytest.mark.parametrize(
    ("metrics", "summary", "message"),
    [
        ('{"step": 1, "loss": 1.0}\n{"loss": 2.0}\n', None, r"metrics.jsonl:2: not a metrics row"),
        ('{"step": 1, "loss": 1.0}\n[1, 2]\n', None, r"metrics.jsonl:2: not a metrics row"),
        ("", None, r"metrics.jsonl: no metrics rows"),
        ('{"step": 1, "loss": 1.0}\n', "{not json", r"summary.json: not valid JSON"),
        ('{"step": 1, "loss": 1.0}\n', "[0.5]", r"summary.json: not a JSON object"),
    ],
)
def test_damaged_run_files_are_named_and_nothing_is_written(tmp_path, metrics, summary, message):
    (tmp_path / "metrics.jsonl").write_text(metrics)
    if summary is not None:
        (tmp_path / "summary.json").write_text(summary)
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()
