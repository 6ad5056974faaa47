"""metrics.jsonl and W&B (training/logger.py): a fresh run starts the file anew, a resumed run drops the
lines of the steps it redoes, and W&B gets the same rows under one run id per run directory; the W&B
settings a config leaves null come from the WANDB_* variables.

The W&B test uses the real W&B offline, which starts a service process (cli tier).
"""

import json

import pytest

from opd_cli.config.validate import check_logger
from opd_cli.errors import UserError
from opd_cli.training.logger import MetricsLogger, wandb_settings

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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "samples.jsonl"]  # no temporary file


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
    write under one run id, another directory gets another; metrics.jsonl has every row.

    Offline, W&B makes a new ``offline-run-<time>-<id>`` folder for each process even with the same id
    and resume="allow": ``wandb sync <run dir>/wandb/offline-run-*`` uploads them into the one run, in
    order of start time. The samples go to the W&B table ``samples``."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg(["logger=wandb"]).logger  # offline by default
    logger = MetricsLogger(tmp_path, cfg, {"loss": {"k": 4}}, None)
    logger.log(1, {"loss": 2.0})
    logger.samples(1, [{"step": 1, "phase": "train", "response": "an answer", "teacher_logprob_mean": None}])
    logger.summary({"gap_recovery": 0.5})
    logger.close()
    resumed = MetricsLogger(tmp_path, cfg, {"loss": {"k": 4}}, 1)
    resumed.log(2, {"loss": 1.0})
    resumed.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs)
    table = next((tmp_path / "wandb" / runs[0]).glob("files/media/table/samples_*.table.json"))
    assert json.loads(table.read_text())["data"] == [[1, "train", "an answer", None]]
    assert rows(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    other = tmp_path / "other"
    other.mkdir()
    MetricsLogger(other, cfg, {}, None).close()
    assert (other / "wandb_run_id").read_text().strip() != run_id  # another run directory, another W&B run


def test_wandb_disabled_is_not_started(tmp_path):
    MetricsLogger(tmp_path, compose_cfg(["logger=wandb", "logger.mode=disabled"]).logger, {}, None).close()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_run_id").exists()


def test_wandb_mode_disabled_in_the_environment_starts_no_run(tmp_path):
    """logger.mode is null by default: WANDB_MODE=disabled turns W&B off (nothing written for it)."""
    cfg = compose_cfg(["logger=wandb"]).logger
    MetricsLogger(tmp_path, cfg, {}, None, env={"WANDB_MODE": "disabled"}).close()
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_run_id").exists()


WANDB_ENV = {
    "WANDB_MODE": "online",
    "WANDB_PROJECT": "env-project",
    "WANDB_ENTITY": "env-team",
    "WANDB_NAME": "env-name",
    "WANDB_RUN_GROUP": "env-group",
    "WANDB_TAGS": "a, b,,c",
}


def test_wandb_settings_null_keys_take_the_environment():
    cfg = compose_cfg(["logger=wandb"]).logger
    assert wandb_settings(cfg, WANDB_ENV, "run-dir") == {
        "mode": "online",
        "project": "env-project",
        "entity": "env-team",
        "name": "env-name",
        "group": "env-group",
        "tags": ["a", "b", "c"],
    }


def test_wandb_settings_without_environment_take_the_defaults():
    cfg = compose_cfg(["logger=wandb"]).logger
    empty = {"WANDB_NAME": "", "WANDB_TAGS": " "}  # set but empty: as if unset
    assert wandb_settings(cfg, empty, "run-dir") == {
        "mode": "offline",
        "project": "opd-cli",
        "entity": None,
        "name": "run-dir",
        "group": None,
        "tags": [],
    }


def test_wandb_settings_a_value_set_in_the_config_wins():
    overrides = ["logger.mode=offline", "logger.project=p", "logger.entity=e", "logger.name=n", "logger.group=g"]
    cfg = compose_cfg(["logger=wandb", *overrides, "logger.tags=[x]"]).logger
    settings = wandb_settings(cfg, WANDB_ENV, "run-dir")
    assert settings == {"mode": "offline", "project": "p", "entity": "e", "name": "n", "group": "g", "tags": ["x"]}
    # an empty list is set too: no tags, whatever WANDB_TAGS says
    assert wandb_settings(compose_cfg(["logger.tags=[]"]).logger, WANDB_ENV, "run-dir")["tags"] == []


def test_a_bad_wandb_mode_is_refused_where_the_config_leaves_it_to_the_environment():
    cfg = compose_cfg(["logger=wandb"]).logger
    with pytest.raises(UserError) as err:
        check_logger(cfg, {"WANDB_MODE": "sometimes"})
    assert str(err.value) == (
        "logger.mode: null takes WANDB_MODE from the environment, which is 'sometimes', not one of: "
        "offline, online, disabled; set logger.mode or WANDB_MODE"
    )
    check_logger(compose_cfg(["logger.mode=offline"]).logger, {"WANDB_MODE": "sometimes"})  # the config wins
    check_logger(compose_cfg(["logger=none"]).logger, {"WANDB_MODE": "sometimes"})  # no W&B at all
    with pytest.raises(UserError, match=r"^logger\.mode: 'sometimes' is not one of: offline, online, disabled"):
        check_logger(compose_cfg(["logger.mode=sometimes"]).logger, {})
