"""A run directory's identity: a used directory is refused, a resume runs the saved config, and only
the keys a resume may change are taken from its command line."""

import os

import pytest
from omegaconf import OmegaConf

from opd_cli.config.rundir import (
    RUN_CONFIG,
    check_fresh,
    check_same_run,
    check_steps_ahead,
    check_writable,
    held_run,
    restore,
    saved_config,
)
from opd_cli.config.validate import check_added_keys
from opd_cli.errors import UserError

from ..conftest import compose_cfg

GROUPS = {"model", "teacher", "loss", "rollout", "task", "trainer", "logger", "demo", "paths", "experiment"}


def saved_run(tmp_path, *overrides):
    """A run directory whose run started with ``overrides``."""
    cfg = compose_cfg(overrides)
    OmegaConf.save(cfg, tmp_path / RUN_CONFIG)
    return saved_config(tmp_path)


def resumed(tmp_path, saved, *overrides):
    """What a resume with ``overrides`` runs."""
    overrides = ["trainer.resume=true", *overrides]
    return OmegaConf.create(restore(saved, compose_cfg(overrides), overrides, GROUPS, tmp_path))


def test_empty_or_missing_directory_is_fresh(tmp_path):
    assert held_run(tmp_path / "nope") is None
    (tmp_path / ".hydra").mkdir()  # Hydra's record alone: a run that never started training
    assert held_run(tmp_path) is None
    check_fresh(tmp_path, "hydra.run.dir")


@pytest.mark.parametrize(
    "made", ["checkpoints/step_000012/trainer_state.pt", "metrics.jsonl", "summary.json", RUN_CONFIG]
)
def test_a_directory_holding_a_run_is_refused(made, tmp_path):
    (tmp_path / made).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / made).write_text("x")
    with pytest.raises(UserError, match=r"^hydra\.run\.dir: .* already holds a run.*trainer\.resume=true"):
        check_fresh(tmp_path, "hydra.run.dir")


def test_a_run_directory_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^hydra\.run\.dir: cannot create .*file/run: .*file is not a directory"):
        check_writable(tmp_path / "file" / "run", "hydra.run.dir")
    check_writable(tmp_path / "new" / "run", "hydra.run.dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_directory_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UserError, match=r"^hydra\.run\.dir: cannot write to"):
            check_writable(tmp_path / "run", "hydra.run.dir")
    finally:
        tmp_path.chmod(0o700)


def test_resume_keeps_the_saved_config_and_takes_resumable_keys(tmp_path):
    saved = saved_run(tmp_path, "loss=sampled_token", "trainer.prompts_per_step=4", "loss.k=4")
    cfg = resumed(tmp_path, saved, "trainer.max_steps=50", "logger=none", "eval.every=5")
    assert cfg.loss.name == "sampled_token" and cfg.loss.k == 4 and cfg.trainer.prompts_per_step == 4
    assert cfg.trainer.max_steps == 50 and cfg.logger.backend == "none" and cfg.eval.every == 5
    assert cfg.trainer.resume is True


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["loss=topk_lsm"], "loss"),
        (["loss.k=32"], "loss.k"),  # the default's value, set on the command line: still a change
        (["trainer.lr=0.5"], "trainer.lr"),
        (["experiment=paper_a_lsm"], "eval"),  # the first key (sorted) the setting changes
    ],
)
def test_resume_refuses_a_change_of_what_was_trained(overrides, key, tmp_path):
    saved = saved_run(tmp_path, "loss=sampled_token", "loss.k=4")
    with pytest.raises(UserError, match=rf"^{key}[.\w]*: the run in .* trained with .*a resume cannot change it"):
        resumed(tmp_path, saved, *overrides)


def test_resume_giving_the_saved_values_again_is_fine(tmp_path):
    saved = saved_run(tmp_path, "loss=sampled_token", "loss.k=4")
    assert resumed(tmp_path, saved, "loss=sampled_token", "loss.k=4").loss.k == 4


def test_a_job_whose_config_differs_from_its_saved_one_is_refused(tmp_path):
    saved = saved_run(tmp_path, "loss.k=4")
    check_same_run(saved, compose_cfg(["loss.k=4", "trainer.max_steps=99", "trainer.resume=true"]), tmp_path)
    with pytest.raises(UserError, match=r"^loss\.k: .* trained with 4; a resume cannot change it to 8"):
        check_same_run(saved, compose_cfg(["loss.k=8"]), tmp_path)


def test_a_resume_may_not_end_before_its_last_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "step_000008").mkdir(parents=True)
    check_steps_ahead(tmp_path, 8)
    with pytest.raises(UserError, match=r"^trainer\.max_steps: .* already at step 8; give trainer\.max_steps >= 8"):
        check_steps_ahead(tmp_path, 4)


def test_a_damaged_saved_config_is_named(tmp_path):
    (tmp_path / RUN_CONFIG).write_text("previous: [config\n")
    with pytest.raises(UserError, match=rf"{RUN_CONFIG}: cannot read the run's saved config"):
        saved_config(tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+foo=bar", r"^foo: not a key of the config"),
        ("+loss.kk=4", r"^loss\.kk: not a key of 'loss'.*did you mean loss\.k\?"),
        ("+trainer.max_step=3", r"^trainer\.max_step: not a key of 'trainer'.*did you mean trainer\.max_steps\?"),
    ],
)
def test_a_plus_key_outside_a_free_form_map_is_a_typo(override, message):
    with pytest.raises(UserError, match=message):
        check_added_keys(compose_cfg([override]), [override])


@pytest.mark.parametrize("override", ["+task.chat_template_kwargs.enable_thinking=false", "+trainer.deepspeed.x=1"])
def test_a_plus_key_in_a_free_form_map_is_accepted(override):
    check_added_keys(compose_cfg([override]), [override])


def test_a_run_saved_before_a_key_existed_resumes(tmp_path):
    """Keys added to the schema after a run was saved are at their defaults: not a change of the run."""
    cfg = OmegaConf.to_container(compose_cfg(["loss.k=4"]))
    del cfg["trainer"]["gradient_checkpointing"], cfg["model"]["lora"]
    OmegaConf.save(OmegaConf.create(cfg), tmp_path / RUN_CONFIG)
    check_same_run(saved_config(tmp_path), compose_cfg(["loss.k=4", "trainer.resume=true"]), tmp_path)
