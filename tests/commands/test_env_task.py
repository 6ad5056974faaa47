"""``opd-train task=env_demo``: multi-turn episodes of the demo environment, end to end (integration tier)."""

import json

import pytest

from ..conftest import metrics, opd_train

pytestmark = pytest.mark.integration

ENV = ["task=env_demo", "rollout.max_new_tokens=64", "eval.max_new_tokens=64", "trainer.max_steps=2"]
EPISODE_KEYS = ("env/success", "env/turns", "env/tokens_per_turn", "env/truncated", "env/failed", "env/return")


def assert_episode_run(run_dir) -> None:
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert all(k in r for k in EPISODE_KEYS) and r["grad_norm"] > 0
        assert 1 <= r["env/turns"] <= 6 and 0 <= r["env/success"] <= 1
        # a turn is at most task.env.turn_tokens; the supervised tokens are the actions only
        assert r["env/tokens_per_turn"] <= 8 and r["response_length"] <= r["env/turns"] * 8
    assert 0 <= rows[-1]["eval/acc"] <= 1 and 0 <= rows[0]["eval/acc_teacher"] <= 1


def test_hf_episodes_train_and_log_per_episode_metrics(tmp_path, models_dir):
    opd_train(tmp_path, models_dir, *ENV, "logger.samples_every=1", "logger=none")
    assert_episode_run(tmp_path)
    sample = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("Number: ") and sample["prompt"].endswith("\nAction:")
    assert "Number: " in sample["response"] or sample["truncated"] or sample["length"] <= 8  # the observations too
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["acc_before"] == metrics(tmp_path)[0]["eval/acc"]


def test_vllm_episodes(tmp_path, models_dir):
    opd_train(tmp_path, models_dir, *ENV, "rollout=vllm", "logger=none")
    assert_episode_run(tmp_path)


def test_episodes_on_two_zero2_ranks(tmp_path, models_dir):
    opd_train(tmp_path, models_dir, *ENV, "trainer=zero2", "trainer.nproc_per_node=2", "logger=none")
    assert_episode_run(tmp_path)
