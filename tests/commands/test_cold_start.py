"""scripts/cold_start.sh (``make cold-start``): teacher rollouts, SFT on them, then OPD from the SFT checkpoint,
each stage its own command under one directory, on the tiny demo with the mismatched (tens_first) teacher."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..conftest import CLI_ENV, REPO, SHORT, TINY_DEMO, metrics

VENV = Path(sys.executable).parents[1]


def cold_start(out, models_dir, stages="data sft opd"):
    """``make cold-start`` (the venv of this Python) into ``out``, on the tiny demo."""
    common = [f"paths.models={models_dir}", *TINY_DEMO]
    env = {
        **CLI_ENV,
        "STAGES": stages,
        # the tiny teacher finishes few answers within 64 tokens (the rest are dropped): 64 samples keep some
        "DATA_ARGS": "data.n_problems=16 data.n=4 data.drop_incorrect=false data.max_repeat_fraction=1",
        "SFT_ARGS": " ".join([*SHORT, "trainer.max_steps=2", "rollout.max_new_tokens=64"]),
        "OPD_ARGS": " ".join([*SHORT, "trainer.max_steps=2"]),
    }
    return subprocess.run(
        # -o: never reinstall the environment here
        ["make", "-s", "-o", f"{VENV}/.installed", "cold-start", f"VENV={VENV}", f"COLD_START_DIR={out}",
         f"ARGS={' '.join(common)}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )  # fmt: skip


@pytest.mark.integration
def test_the_three_stages_chain_under_one_directory(tmp_path, models_dir):
    out = tmp_path / "cold"
    # a stage that needs the previous one's output says so in one line
    early = cold_start(out, models_dir, stages="opd")
    assert early.returncode == 2 and f"error: {out}/sft has no checkpoint: run the sft stage first" in early.stderr
    run = cold_start(out, models_dir)
    assert run.returncode == 0, run.stderr[-3000:]
    import datasets

    data = datasets.load_from_disk(str(out / "data/data"))
    stats = json.loads((out / "data/stats.json").read_text())
    assert stats["kept"] == len(data) > 0
    sft = metrics(out / "sft")
    assert [r["step"] for r in sft] == [0, 1, 2] and "overlap_ratio" not in sft[1]
    ckpt = out / "sft/checkpoints/step_000002/model"
    assert ckpt.is_dir()
    opd_cfg = yaml.safe_load((out / "opd/run_config.yaml").read_text())
    assert opd_cfg["model"]["name_or_path"] == str(ckpt) and opd_cfg["demo"]["teacher_style"] == "tens_first"
    opd = metrics(out / "opd")
    assert [r["step"] for r in opd] == [0, 1, 2] and 0 <= opd[1]["overlap_ratio"] <= 1
