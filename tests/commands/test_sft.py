"""``opd-train loss=sft rollout=dataset``: SFT on a data set with the OPD training loop, end to end on the tiny
demo (integration), then OPD from its checkpoint; resume, two DeepSpeed ranks, and its one-line refusals (cli)."""

import json
import math
import re
import subprocess
import sys

import pytest

from ..conftest import CLI_ENV, REPO, assert_resume_matches, metrics, opd_train
from ..rollout.sft_data import write_sft_data

# solutions are at most 39 tokens with EOS: none is cut
SFT = ["loss=sft", "rollout=dataset", "rollout.max_new_tokens=48", "logger=none"]
TEACHER_ONLY = {"logprob_gap", "overlap_ratio", "teacher_entropy", "teacher_rank", "train_rollout_k3_kl"}


@pytest.mark.integration
def test_sft_trains_without_a_teacher_then_opd_starts_from_its_checkpoint(tmp_path, models_dir):
    data = write_sft_data(tmp_path / "data", 16)
    run = tmp_path / "sft"
    # the teacher's path does not exist: SFT must neither check nor load it
    opd_train(
        run, models_dir, *SFT, f"rollout.path={data}", "trainer.max_steps=3", "trainer.lr=1e-2",
        "logger.samples_every=1", f"teacher.name_or_path={tmp_path / 'no_teacher'}",
    )  # fmt: skip
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval/acc" in rows[0] and "eval/acc_teacher" not in rows[0]  # no teacher was evaluated
    for row in rows[1:]:
        assert {"loss", "nll", "entropy", "grad_norm", "response_length"} <= row.keys()
        assert not TEACHER_ONLY & row.keys()  # the diagnostics that need a teacher are not logged
        assert all(math.isfinite(v) for v in row.values()), row
        assert row["response_clip_ratio"] == 0 and row["time/teacher_s"] < 0.01
    assert rows[3]["loss"] < rows[1]["loss"] - 0.5  # it learns the solutions
    assert rows[1]["loss"] == pytest.approx(rows[1]["nll"], rel=1e-5)  # token-mean: the loss is the mean NLL
    summary = json.loads((run / "summary.json").read_text())
    assert summary["acc_teacher"] is None and summary["gap_recovery"] is None
    text = (run / "samples.jsonl").read_text()
    assert "NaN" not in text
    train = [json.loads(line) for line in text.splitlines() if json.loads(line)["phase"] == "train"]
    assert train and all(s["teacher_logprob_mean"] is None and s["student_logprob_mean"] is None for s in train)
    assert all(s["correct"] for s in train)  # the data set's responses are the worked solutions
    # the cold start's second stage: OPD from the SFT checkpoint
    opd = tmp_path / "opd"
    opd_train(opd, models_dir, f"model.name_or_path={run}/checkpoints/step_000003/model", "trainer.max_steps=1")
    assert "logprob_gap" in metrics(opd)[1] and "eval/acc_teacher" in metrics(opd)[0]


@pytest.mark.integration
def test_sft_resume_matches_uninterrupted_run(tmp_path, models_dir):
    common = [*SFT, f"rollout.path={write_sft_data(tmp_path / 'data', 12)}", "trainer.save_every=2"]
    opd_train(tmp_path / "full", models_dir, *common, "trainer.max_steps=4")
    opd_train(tmp_path / "part", models_dir, *common, "trainer.max_steps=2")
    opd_train(tmp_path / "part", models_dir, *common, "trainer.max_steps=4", "trainer.resume=true")
    assert_resume_matches(tmp_path / "full", tmp_path / "part", ("loss", "grad_norm", "entropy", "nll"))


@pytest.mark.integration
def test_two_deepspeed_ranks_train_as_one_process(tmp_path, models_dir):
    """No sampling: two ZeRO-2 ranks, each with half of every step's rows, train exactly as one process."""
    common = [*SFT, f"rollout.path={write_sft_data(tmp_path / 'data', 16)}", "trainer.max_steps=2"]
    opd_train(tmp_path / "two", models_dir, *common, "trainer=zero2", "trainer.nproc_per_node=2")
    opd_train(tmp_path / "one", models_dir, *common)
    two, one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [0, 1, 2]
    for a, b in zip(two[1:], one[1:], strict=True):
        assert a["response_length"] == b["response_length"]  # the same rows
        for key in ("loss", "grad_norm", "nll"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert (tmp_path / "two/checkpoints/step_000002/model").is_dir()


BAD = [
    (["loss=sft", "rollout=dataset"], r"^error: rollout\.path: rollout=dataset trains on a data set"),
    (["loss=sft", "rollout=dataset", "rollout.path=DATA", "rollout.response_key=text"],
     r"^error: rollout\.response_key: the data set at \S+ has no column 'text' \(its columns: question, "),
    (["rollout=dataset", "rollout.path=DATA"], r"^error: loss: 'topk_lsm' distills on the student's own samples"),
    (["loss=sft"], r"^error: rollout\.engine: loss=sft fine-tunes on a data set's responses"),
]  # fmt: skip


@pytest.mark.cli
@pytest.mark.parametrize("args,pattern", BAD, ids=["no path", "no column", "opd on data", "sft sampling"])
def test_bad_sft_input_is_one_line_before_the_run_directory(args, pattern, tmp_path):
    data = write_sft_data(tmp_path / "data", 4)
    run_dir = tmp_path / "run"
    argv = [a.replace("DATA", str(data)) for a in args]
    out = subprocess.run(
        [sys.executable, "-m", "opd_cli.commands.train", *argv, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=300,
    )  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and re.search(pattern, lines[0]), out.stderr
    assert not run_dir.exists()
