"""Many ranks with DeepSpeed ZeRO on CPU processes (gloo), launched by the real opd-train (integration tier)."""

import json
import os
import signal
import subprocess
import time

import pytest
from transformers import AutoModelForCausalLM

from ..conftest import CLI_ENV, REPO, assert_resume_matches, cli_argv, metrics, opd_train

pytestmark = pytest.mark.integration

TWO = ["trainer.nproc_per_node=2", "logger=none"]


def assert_complete(run_dir, steps: int) -> None:
    """A 2-rank run of ``steps`` steps: one metrics writer (rank 0), each rank's RNG saved, and the
    checkpoint's model consolidated from the shards into one HF model."""
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(steps + 1))
    assert all(r["grad_norm"] > 0 for r in rows[1:])
    ckpt = run_dir / f"checkpoints/step_{steps:06d}"
    assert {p.name for p in ckpt.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    model = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    assert all(p.numel() > 0 for p in model.parameters())
    assert (run_dir / "resolved_config.yaml").exists()


SELF_LIVE = ["teacher=self", "teacher.self_weights=live", "teacher.prompt.system=Add the tens first."]


def test_two_ranks_complete_bf16_mixed(tmp_path, models_dir):
    """ZeRO-2 at bf16-mixed (float32 masters); ZeRO-2 and ZeRO-3 at fp32 are the accumulation and samples tests'.
    The teacher is the live student after a privileged prompt (teacher=self): each rank scores with its own
    replica of the student."""
    args = ["trainer=zero2", *TWO, "trainer.max_steps=2", "trainer.precision=bf16-mixed", *SELF_LIVE]
    opd_train(tmp_path, models_dir, *args)
    assert_complete(tmp_path, 2)
    assert metrics(tmp_path)[0]["eval/acc_teacher"] >= 0


def test_live_self_teacher_under_zero3(tmp_path, models_dir):
    """The live student as its own teacher while ZeRO-3 partitions it: a no-gradient forward of the sharded
    student, its head gathered for the scoring pass only."""
    opd_train(tmp_path, models_dir, "trainer=zero3", *TWO, "trainer.max_steps=2", *SELF_LIVE)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["grad_norm"] > 0 for r in rows[1:])


# token-mean weighs tokens over the whole mini-batch, seq-mean-token-mean each sequence by its own length; the
# other two aggregations are seq-mean-token-mean's per-sequence weighting times a constant (tests/objectives/
# test_advantages.py), so these two cover how a rank split could change the weights
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_two_ranks_equal_one_process_with_accumulation(agg, tmp_path, models_dir):
    """Same rollouts (nucleus 1e-4 makes sampling greedy), micro-batch 4: 2 ranks x 1 micro-batch
    against 1 process x 2 micro-batches (gradient accumulation 2)."""
    same = ["trainer=zero2", "logger=none", "trainer.max_steps=3", "rollout.top_p=0.0001", "trainer.micro_batch_size=4"]
    same.append(f"loss.agg={agg}")
    opd_train(tmp_path / "two", models_dir, *same, "trainer.nproc_per_node=2")
    opd_train(tmp_path / "one", models_dir, *same, "trainer.nproc_per_node=1")
    assert_complete(tmp_path / "two", 3)
    two, one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert len(two) == len(one) == 4
    for a, b in zip(two[1:], one[1:], strict=True):
        assert a["response_length"] == b["response_length"]  # the same rollouts
        for key in ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_resume_two_ranks(tmp_path, models_dir):
    common = ["trainer=zero2", *TWO, "trainer.save_every=2"]
    opd_train(tmp_path / "full", models_dir, *common, "trainer.max_steps=4")
    opd_train(tmp_path / "part", models_dir, *common, "trainer.max_steps=2")
    opd_train(tmp_path / "part", models_dir, *common, "trainer.max_steps=4", "trainer.resume=true")
    assert_resume_matches(tmp_path / "full", tmp_path / "part", ("loss", "grad_norm", "entropy", "response_length"))


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, ValueError):
                pass
    return kids


def _rank_pid(parent: int, rank: int) -> int | None:
    for pid in _children(parent):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return pid
        except OSError:
            pass
    return None


def _start(run_dir, models_dir, *args):
    return subprocess.Popen(
        cli_argv(run_dir, models_dir, *args),
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(run_dir, step: int, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r["step"] >= step for r in metrics(run_dir)):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


LONG = ["trainer=zero2", *TWO, "trainer.max_steps=200", "eval.n_problems=2", "eval.k=1"]


def test_killing_one_rank_stops_the_job(tmp_path, models_dir):
    proc = _start(tmp_path, models_dir, *LONG)
    _wait_for_step(tmp_path, 1, proc)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 60
    assert proc.returncode != 0
    assert "rank 1 failed" in err, err[-2000:]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killing_the_launcher_kills_its_ranks(tmp_path, models_dir):
    """kill -9 of opd-train leaves no handler to stop the ranks; they die with it instead of running on."""
    proc = _start(tmp_path, models_dir, *LONG)
    _wait_for_step(tmp_path, 1, proc)
    ranks = [_rank_pid(proc.pid, r) for r in (0, 1)]
    assert None not in ranks
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while any(map(_alive, ranks)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, ranks)), f"ranks still alive 10 s after the launcher died: {ranks}"


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, models_dir):
    proc = _start(tmp_path, models_dir, *LONG)
    _wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert saved, err[-2000:]
    step = int(saved[-1].removeprefix("step_"))
    assert step >= 2
    opd_train(tmp_path, models_dir, *LONG, f"trainer.max_steps={step + 1}", "trainer.resume=true")
    assert [r["step"] for r in metrics(tmp_path)][-2:] == [step, step + 1]


def test_killed_during_save_resumes_from_previous_checkpoint(tmp_path, models_dir):
    common = ["trainer=zero2", *TWO, "trainer.save_every=1"]
    out = subprocess.run(
        cli_argv(tmp_path, models_dir, *common, "trainer.max_steps=3"),
        cwd=REPO,
        env={**CLI_ENV, "OPD_TEST_KILL_BEFORE_COMMIT": "step_000002"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000001"]
    opd_train(tmp_path, models_dir, *common, "trainer.max_steps=3", "trainer.resume=true")
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2, 3]
    assert (tmp_path / "checkpoints/step_000003/trainer_state.pt").exists()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the killed save's leftovers are gone


def test_sharded_teacher_under_zero3(tmp_path, models_dir):
    opd_train(tmp_path, models_dir, "trainer=zero3", *TWO, "trainer.max_steps=2", "teacher.shard=true")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval/acc_teacher"] >= 0


def test_sharded_teacher_refuses_an_objective_needing_the_full_q(tmp_path, models_dir):
    args = ["trainer=zero3", *TWO, "trainer.max_steps=1", "teacher.shard=true", "loss=full_rkl"]
    out = subprocess.run(cli_argv(tmp_path, models_dir, *args), capture_output=True, text=True, cwd=REPO, env=CLI_ENV)
    assert out.returncode == 2
    assert "error: loss: 'full_rkl' needs full from the teacher" in out.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_two_ranks_rank_0_writes_the_samples_of_its_share(tmp_path, models_dir):
    """samples.jsonl under ZeRO-3 (the rollout runs in step on both ranks): rank 0 writes its own share of
    each step's prompts (2 of trainer.prompts_per_step=4), and the evaluations' samples, once."""
    opd_train(tmp_path, models_dir, "trainer=zero3", *TWO, "trainer.max_steps=2", "logger.samples_every=1")
    assert_complete(tmp_path, 2)  # ZeRO-3 at fp32: the model gathered from the shards
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    phases = [(0, "eval_teacher"), (0, "eval"), (1, "train"), (2, "train"), (2, "eval")]
    assert [(r["step"], r["phase"]) for r in rows] == [p for p in phases for _ in range(4)]
    for step in (1, 2):  # rank 0's 2 prompts x rollout.n=2 responses
        assert len({r["prompt"] for r in rows if r["step"] == step and r["phase"] == "train"}) == 2
    assert all(isinstance(r["teacher_logprob_mean"], float) for r in rows if r["phase"] == "train")
