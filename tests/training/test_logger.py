"""metrics.jsonl and W&B (training/logger.py): a fresh run starts the file anew, a resumed run drops the
lines of the steps it redoes, and W&B gets the same rows under one run id per run directory.

The W&B test uses the real W&B offline, which starts a service process (cli tier).
"""

import json

import pytest

from opd_cli.training.logger import MetricsLogger

from ..conftest import compose_cfg


@pytest.fixture(scope="module")
def no_wandb():
    return compose_cfg(["logger=none"]).logger


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def old_run(run_dir, last_step: int) -> list[dict]:
    """metrics.jsonl of a run that logged steps 0..last_step (step 0: the evaluation before training)."""
    old = [{"step": 0, "eval/acc": 0.1}] + [{"step": s, "loss": 10.0 + s} for s in range(1, last_step + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    return old


def test_a_fresh_run_starts_the_file_anew(tmp_path, no_wandb):
    old_run(tmp_path, 5)  # a directory used before (e.g. a sweep run again)
    logger = MetricsLogger(tmp_path, no_wandb, {}, None)
    logger.log(0, {"eval/acc": 0.2})
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert rows(tmp_path) == [{"step": 0, "eval/acc": 0.2}, {"step": 1, "loss": 1.0}]
    assert logger.wandb is None


def test_resume_drops_the_steps_after_the_checkpoint(tmp_path, no_wandb):
    """The run got to step 5, its last checkpoint is step 3: steps 4 and 5 are redone, so their old
    lines go and the new ones follow step 3's, each step once."""
    old = old_run(tmp_path, 5)
    logger = MetricsLogger(tmp_path, no_wandb, {}, 3)
    assert rows(tmp_path) == old[:4]  # already on disk before the first new row
    for step in (4, 5, 6):
        logger.log(step, {"loss": float(step)})
    logger.close()
    assert rows(tmp_path) == old[:4] + [{"step": s, "loss": float(s)} for s in (4, 5, 6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_resume_drops_a_half_written_last_line(tmp_path, no_wandb):
    """A run killed while writing left part of a row: resuming keeps the whole rows up to the
    checkpoint and drops the fragment, so every line of the file parses again."""
    old = old_run(tmp_path, 3)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')
    logger = MetricsLogger(tmp_path, no_wandb, {}, 3)
    logger.log(4, {"loss": 4.0})
    logger.close()
    assert rows(tmp_path) == old + [{"step": 4, "loss": 4.0}]


def test_resume_without_a_metrics_file_starts_one(tmp_path, no_wandb):
    logger = MetricsLogger(tmp_path, no_wandb, {}, 2)
    logger.log(3, {"loss": 0.5})
    logger.close()
    assert rows(tmp_path) == [{"step": 3, "loss": 0.5}]


@pytest.mark.cli
def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """The real W&B, offline (it starts its service process: cli tier): both runs of one directory
    write under one run id, another directory gets another; metrics.jsonl has every row."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(["logger=wandb"]).logger  # offline by default
    logger = MetricsLogger(tmp_path, cfg, {"loss": {"k": 4}}, None)
    logger.log(1, {"loss": 2.0})
    logger.summary({"gap_recovery": 0.5})
    logger.close()
    resumed = MetricsLogger(tmp_path, cfg, {"loss": {"k": 4}}, 1)
    resumed.log(2, {"loss": 1.0})
    resumed.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs)
    assert rows(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    other = tmp_path / "other"
    other.mkdir()
    MetricsLogger(other, cfg, {}, None).close()
    assert (other / "wandb_run_id").read_text().strip() != run_id  # another run directory, another W&B run


def test_wandb_disabled_is_not_started(tmp_path):
    MetricsLogger(tmp_path, compose_cfg(["logger=wandb", "logger.mode=disabled"]).logger, {}, None).close()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_run_id").exists()
