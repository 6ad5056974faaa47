"""SLURM: the environment parsing, the launcher preset, and a real sweep through a single-node SLURM.

The sweep test starts a SLURM cluster with scripts/slurm_up.sh when none is running and
this process may (root). Elsewhere it is skipped, unless OPD_REQUIRE_SLURM=1 (CI sets it),
which turns the skip into a failure.
"""

import json
import os
import shutil
import subprocess

import pytest

from opd_cli.training.launch import first_host, slurm_rendezvous

from ..conftest import CLI_ENV, REPO, cli_argv


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("vm", "vm"),
        ("gpu[07-09,12]", "gpu07"),
        ("gpu[3,5],cpu1", "gpu3"),
        ("a-b-1,a-b-2", "a-b-1"),
        ("n[001-004]", "n001"),
    ],
)
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_slurm_rendezvous_from_environment():
    env = {"SLURM_JOB_ID": "4242", "SLURM_NODEID": "2", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[10-13]"}
    assert slurm_rendezvous(env) == {"nnodes": 4, "node_rank": 2, "master_addr": "gpu10", "master_port": 24242}
    assert slurm_rendezvous({"SLURM_JOB_ID": "1"}) is None  # not inside a job step
    assert slurm_rendezvous({}) is None


@pytest.mark.cli
def test_slurm_launcher_composes():
    out = subprocess.run(
        [*cli_argv("/tmp/unused", "/tmp/unused")[:3], "--cfg", "hydra", "hydra/launcher=slurm", "trainer.nnodes=4"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=CLI_ENV,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in out.stdout
    assert "partition: debug" in out.stdout and "tasks_per_node: 1" in out.stdout


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sinfo") and subprocess.run(["sinfo"], capture_output=True).returncode == 0:
        return
    if os.geteuid() == 0:
        subprocess.run(["bash", str(REPO / "scripts/slurm_up.sh")], check=True, timeout=600)
        return
    if os.environ.get("OPD_REQUIRE_SLURM") == "1":
        pytest.fail("OPD_REQUIRE_SLURM=1 but no SLURM is running and scripts/slurm_up.sh needs root")
    pytest.skip("no SLURM here (scripts/slurm_up.sh starts one as root)")


@pytest.mark.integration
def test_sweep_through_slurm(slurm, tmp_path, models_dir):
    sweep = tmp_path / "sweep"
    args = cli_argv(tmp_path / "unused", models_dir, "logger=none", "trainer.max_steps=2", "trainer=zero2")
    args += ["trainer.nproc_per_node=2", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", "loss.k=4,16"]
    args.remove(f"hydra.run.dir={tmp_path / 'unused'}")
    out = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2, jobs
    for job in jobs:
        rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2], job
        assert (job / "summary.json").exists()
    assert {json.loads((j / "summary.json").read_text())["step"] for j in jobs} == {2}
    assert list((sweep / ".submitit").iterdir())  # they ran as SLURM jobs
