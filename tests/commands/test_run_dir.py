"""One run per directory, a resume that keeps the run's config, stops that leave a resumable state, and a
diverging run that stops before saving: the real opd-train on the tiny demo."""

import hashlib
import signal
import subprocess
import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from .conftest import CLI_ENV, REPO, cli_argv, metrics, opd_train


def tree(root):
    """Every file under ``root`` with a hash of its bytes: equal trees mean nothing was created or changed."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def refused(run_dir, models_dir, *args):
    """opd-train with ``args`` ends with exit 2 and one line, and leaves ``run_dir`` as it was; returns the line."""
    before = tree(run_dir)
    out = subprocess.run(cli_argv(run_dir, models_dir, *args), capture_output=True, text=True, cwd=REPO, env=CLI_ENV)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert tree(run_dir) == before
    return lines[0]


RUN = ["loss=sampled_token", "trainer.save_every=1", "logger=none"]


@pytest.mark.integration
def test_a_run_directory_keeps_its_run(tmp_path, models_dir):
    run = tmp_path / "run"
    opd_train(run, models_dir, *RUN, "trainer.max_steps=2")
    record = (run / ".hydra" / "config.yaml").read_text()

    line = refused(run, models_dir, *RUN, "trainer.max_steps=2")  # a second run into the same directory
    assert line.startswith(f"error: hydra.run.dir: {run} already holds a run with checkpoints up to step 2")
    line = refused(run, models_dir, *RUN, "trainer.max_steps=4", "trainer.resume=true", "loss=topk_lsm")
    assert line.startswith("error: loss.") and "trained with" in line and "a resume cannot change it" in line
    line = refused(run, models_dir, *RUN, "trainer.max_steps=1", "trainer.resume=true")
    assert "trainer.max_steps: the run in" in line and "already at step 2" in line

    # a resume that names only what may change: the run goes on as it started (sampled_token, 4 prompts)
    short = cli_argv(run, models_dir, "trainer.max_steps=3", "trainer.resume=true")
    out = subprocess.run([*short[:3], *(a for a in short[3:] if a.startswith(("hydra.", "paths.", "trainer.")))],
                         capture_output=True, text=True, cwd=REPO, env={**CLI_ENV, "WANDB_MODE": "disabled"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["step"] for r in metrics(run)] == [0, 1, 2, 3]
    assert (run / ".hydra" / "config.yaml").read_text() == record  # the run's own record stays
    resumed = OmegaConf.load(run / ".hydra" / "resume-1" / "config.yaml")
    assert resumed.loss.name == "sampled_token" and resumed.trainer.max_steps == 3 and resumed.demo.hidden_size == 64
    assert OmegaConf.load(run / ".hydra" / "resume-1" / "overrides.yaml")[-1] == "trainer.resume=true"


@pytest.mark.cli
def test_a_sweep_with_one_bad_job_starts_none(tmp_path, models_dir):
    sweep = tmp_path / "sweep"
    argv = cli_argv(tmp_path / "run", models_dir, f"hydra.sweep.dir={sweep}", "loss.k=4,0", "logger=none")
    out = subprocess.run([*argv[:3], "--multirun", *argv[3:]], capture_output=True, text=True, cwd=REPO, env=CLI_ENV)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip() == "error: loss.k: must be an integer >= 1, got 0 (in the sweep's job loss.k=0)"
    assert not sweep.exists()


@pytest.mark.cli
def test_a_run_directory_that_cannot_be_made_is_named(tmp_path, models_dir):
    (tmp_path / "file").write_text("x")
    line = refused(tmp_path, models_dir, f"hydra.run.dir={tmp_path / 'file' / 'run'}")
    assert (
        line
        == f"error: hydra.run.dir: cannot create {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is not a directory"
    )


@pytest.mark.integration
def test_sigterm_before_training_leaves_a_resumable_step_0(tmp_path, models_dir):
    """A SIGTERM while models load and the teacher and student are evaluated: the run saves step 0 (the
    evaluation's results) after the evaluation, and a resume trains from there without evaluating again."""
    args = ["logger=none", "trainer.max_steps=1"]
    proc = subprocess.Popen(cli_argv(tmp_path, models_dir, *args), cwd=REPO, env=CLI_ENV, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    deadline = time.time() + 300
    while not (tmp_path / "run_config.yaml").exists():  # written once the stop request is listened for
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert (
        err.strip().splitlines()[-1] == "error: stopped by SIGTERM after saving step 0; resume with trainer.resume=true"
    )
    assert (tmp_path / "checkpoints" / "step_000000" / "trainer_state.pt").exists()
    opd_train(tmp_path, models_dir, *args, "trainer.resume=true")
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1]


@pytest.mark.integration
def test_a_diverging_run_stops_before_saving_a_non_finite_step(tmp_path, models_dir):
    argv = cli_argv(
        tmp_path, models_dir, "logger=none", "trainer.max_steps=6", "trainer.save_every=1", "trainer.lr=1e30"
    )
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: step ") and "the run stopped before saving this step" in line, line
    step = int(line.split()[2].rstrip(":"))
    saved = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert len(saved) == step - 1  # every step before the diverged one, none after
    for ckpt in saved:
        weights = load_file(ckpt / "model" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt


@pytest.mark.integration
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_partial_save(tmp_path, models_dir):
    """The run directory on a 256 KiB tmpfs: the first checkpoint does not fit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs privileges this machine does not give")
    try:
        run = disk / "run"
        argv = cli_argv(run, models_dir, "logger=none", "trainer.max_steps=2", "trainer.save_every=1")
        out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=600)
        assert out.returncode == 2, out.stderr[-3000:]
        line = out.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: {run / 'checkpoints'}: no space left on device saving step 1"), line
        assert "Traceback" not in out.stderr
        assert not list((run / "checkpoints").iterdir())  # no .tmp-step_* left behind
    finally:
        subprocess.run(["umount", str(disk)], check=False)
