"""The real opd-train CLI end to end on tiny demo models (integration tier)."""

import json
import math

import pytest

from opd_cli.training.loop import train

from ..conftest import REPO, SHORT, TINY_DEMO, compose_cfg, metrics, opd_train

pytestmark = pytest.mark.integration

STEP_KEYS = {
    "loss",
    "grad_norm",
    "pg_clipfrac",
    "response_clip_ratio",
    "entropy",
    "logprob_gap",
    "overlap_ratio",
    "response_length",
    "tokens_per_s",
    "step_time_s",
    "overlap_mass_student",
    "overlap_mass_teacher",
    "overlap_adv",
    "entropy_gap",
    "teacher_rank",
    "repetition",
    "logprob_gap/bucket_0",
    "overlap_ratio/bucket_0",
    "peak_mem_gb",
    "pg_clipfrac_lower",
    "teacher_entropy",
    "train_rollout_logprob_abs_diff",
    "train_rollout_k3_kl",
}
LOSS_PRESETS = sorted(p.stem for p in (REPO / "conf/loss").glob("*.yaml") if p.stem != "_base")


def test_topk_lsm_two_steps_with_wandb_offline(tmp_path, models_dir):
    run = tmp_path / "lsm"
    fixture = REPO / "tests/fixtures/aime24.jsonl"
    opd_train(
        run, models_dir, "trainer.max_steps=2", "loss=topk_lsm", "loss.k=4", "rollout.top_p=0.9", "loss.outcome_weight=0.5",
        "eval.benchmarks=[aime24]", f"eval.benchmark_paths.aime24={fixture}",
    )  # fmt: skip
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert 0 <= rows[2]["eval/aime24/acc"] <= 1 and "eval/aime24/acc" not in rows[1]  # scored at eval steps
    for row in rows[1:]:
        assert STEP_KEYS <= row.keys()
        assert row["loss"] >= 0 and row["grad_norm"] > 0 and 0 <= row["overlap_ratio"] <= 1
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"acc_before", "acc_after", "acc_teacher", "gap_recovery", "step"}
    assert summary["step"] == 2
    assert (run / "checkpoints/step_000002/model/model.safetensors").exists()
    # W&B wrote an offline run holding the logged keys
    logs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert logs and b"logprob_gap" in logs[0].read_bytes()
    # the demo models were built once into the shared cache
    assert len(list(models_dir.glob("arith-demo-*/student-*/model.safetensors"))) == 1


def test_sampled_token_two_steps(tmp_path, models_dir):
    run = tmp_path / "st"
    opd_train(
        run,
        models_dir,
        "trainer.max_steps=2",
        "loss=sampled_token",
        "trainer.mini_batches=2",
        "loss.mask_tokens=['<|endoftext|>']",
        "loss.mask_mode=all",
        "loss.entropy_top_ratio=0.5",
        "loss.agg=seq-mean-token-sum",
        "loss.dual_clip=3",
        "loss.log_ratio_clip=5",
        "loss.outcome_weight=1.0",
        "logger=none",
    )
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(STEP_KEYS <= r.keys() and 0 <= r["outcome_score"] <= 1 for r in rows[1:])


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_resume_matches_uninterrupted_run(precision, tmp_path, models_dir):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["logger=none", "trainer.save_every=2", f"trainer.precision={precision}"]
    opd_train(full, models_dir, "trainer.max_steps=4", *common)
    opd_train(part, models_dir, "trainer.max_steps=2", *common)
    opd_train(part, models_dir, "trainer.max_steps=4", "trainer.resume=true", *common)
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a[3:], b[3:], strict=True):
        for key in ("loss", "grad_norm", "entropy", "logprob_gap", "response_length"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("name", LOSS_PRESETS)
def test_every_loss_preset_runs_two_steps(name, tmp_path, models_dir):
    """Each preset trains 2 steps on the demo task (in process, the config composed as the CLI does)."""
    overrides = [f"paths.models={models_dir}", *TINY_DEMO, *SHORT, "eval.n_problems=4", "eval.k=1"]
    cfg = compose_cfg([*overrides, "logger=none", "trainer.max_steps=2", f"loss={name}", "loss.k=8"])
    summary = train(cfg, tmp_path)
    assert summary["step"] == 2
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert STEP_KEYS <= row.keys()
        assert all(math.isfinite(v) for v in row.values()), row
        assert row["grad_norm"] > 0
