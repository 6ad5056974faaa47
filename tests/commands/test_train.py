"""opd-train (commands/train.py): end to end on tiny demo models (integration), and its one-line errors."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from opd_cli.training.loop import train

from ..conftest import REPO, SHORT, TINY_DEMO, assert_resume_matches, compose_cfg, metrics, opd_train
from ..models.tiny import save_model
from ..rollout.sft_data import write_sft_data

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
SFT_STEP_KEYS = {"loss", "nll", "entropy", "grad_norm", "response_clip_ratio", "response_length", "peak_mem_gb"}
LOSS_PRESETS = sorted(p.stem for p in (REPO / "conf/loss").glob("*.yaml") if p.stem != "_base")


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_resume_matches_uninterrupted_run(precision, tmp_path, models_dir):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["logger=none", "trainer.save_every=2", f"trainer.precision={precision}"]
    opd_train(full, models_dir, "trainer.max_steps=4", *common)
    opd_train(part, models_dir, "trainer.max_steps=2", *common)
    opd_train(part, models_dir, "trainer.max_steps=4", "trainer.resume=true", *common)
    assert_resume_matches(full, part)


@pytest.mark.integration
@pytest.mark.parametrize("name", LOSS_PRESETS)
def test_every_loss_preset_runs_two_steps(name, tmp_path, models_dir):
    """Each preset trains 2 steps on the demo task (in process, the config composed as the CLI does)."""
    overrides = [f"paths.models={models_dir}", *TINY_DEMO, *SHORT, "eval.n_problems=4", "eval.k=1"]
    if name == "sft":  # it trains on a data set's responses, and has no teacher diagnostics
        overrides += ["rollout=dataset", f"rollout.path={write_sft_data(tmp_path / 'data', 8)}"]
    cfg = compose_cfg([*overrides, "logger=none", "trainer.max_steps=2", f"loss={name}", "loss.k=8"])
    summary = train(cfg, tmp_path / "run")
    assert summary["step"] == 2
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert (SFT_STEP_KEYS if name == "sft" else STEP_KEYS) <= row.keys()
        assert all(math.isfinite(v) for v in row.values()), row
        assert row["grad_norm"] > 0


# --------------------------------------------------------------------------- errors and --cfg


def run_cli(*args, env=None, timeout=300):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "opd_cli.commands.train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full_env,
        timeout=timeout,
    )


@pytest.mark.cli
def test_cfg_job_prints_the_composed_config():
    out = run_cli("--cfg", "job", "loss=topk_lsm", "loss.k=16")
    assert out.returncode == 0, out.stderr
    assert OmegaConf.create(out.stdout).loss.k == 16


BAD_INPUTS = [
    (["loss=nope"], r"^error: loss: unknown preset 'nope'; choose one of: .*sampled_token.*topk_lsm"),
    (["loss.k=0"], r"^error: loss\.k: must be an integer >= 1, got 0$"),
    (["rollout.top_p=1.5"], r"^error: rollout\.top_p: must be in \(0, 1\], got 1\.5$"),
    (["rollout.top_p=0"], r"^error: rollout\.top_p: must be in \(0, 1\], got 0"),
    (["rollout.max_new_tokens=-5"], r"^error: rollout\.max_new_tokens: must be an integer >= 1, got -5$"),
    (["model.name_or_path=./missing/model"], r"^error: model\.name_or_path: local model path not found"),
    (["loss.k=abc"], r"^error: .*loss\.k.*abc"),
    (["trainer.betas=[0.9]"], r"^error: trainer\.betas: must be two numbers in \[0, 1\)"),
    (["trainer.weight_decay=-1"], r"^error: trainer\.weight_decay: must be a finite number >= 0, got -1"),
    (["trainer.lr=inf"], r"^error: trainer\.lr: must be a finite number > 0, got inf$"),
    (["rollout.temperature=inf"], r"^error: rollout\.temperature: must be a finite number > 0, got inf$"),
    (["+trainer.max_step=3"], r"^error: trainer\.max_step: not a key of 'trainer'.*did you mean trainer\.max_steps\?$"),
    (["+foo=bar"], r"^error: foo: not a key of the config"),
    (["task.template='Q: {question} {foo}'"], r"^error: task\.template: unknown placeholder '\{foo\}'"),
    (["task.n_eval=9000"], r"^error: task\.n_eval: "),
    (
        ["teacher.backend=vllm", "loss=fkl"],
        r"^error: loss: 'fkl' needs full from the teacher, which teacher\.backend=vllm",
    ),
    (["loss.nokey=1"], r"^error: .*nokey"),
    (
        ["loss.mask_tokens=[<|im_end|>]"],
        r"^error: cannot parse the override 'loss\.mask_tokens=\[<\|im_end\|>\]': quote",
    ),
]

if not torch.cuda.is_available():
    BAD_INPUTS += [
        (["trainer.device=cuda"], r"^error: trainer\.device: cuda asked for, but torch sees no CUDA device"),
        (["rollout=vllm", "rollout.sleep=true"], r"^error: rollout\.sleep=true: vLLM's sleep mode needs a GPU"),
    ]


@pytest.mark.cli
@pytest.mark.parametrize("args,pattern", BAD_INPUTS, ids=[a[0] for a, _ in BAD_INPUTS])
def test_bad_input_one_line_exit_2_nothing_overwritten(args, pattern, tmp_path):
    run_dir = tmp_path / "existing_run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("previous: config\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    out = run_cli(*args, f"hydra.run.dir={run_dir}", "trainer.resume=true")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), out.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "previous: config\n"
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "metrics.jsonl"]


@pytest.mark.cli
@pytest.mark.parametrize(
    "args,pattern",
    [
        (
            ["model=qwen2.5-7b-instruct", "teacher=openthinker3"],
            r"^error: model\.name_or_path: cannot load 'Qwen/Qwen2\.5-7B-Instruct'.*fetched",
        ),
        (["task=dapo_math"], r"^error: task\.dataset: cannot load data set 'BytedTsinghua-SIA/DAPO-Math-17k'"),
    ],
)
def test_hub_presets_fail_offline_with_one_line(args, pattern, tmp_path, tiny_model, tiny_tokenizer):
    if "task=dapo_math" in args:
        # the demo models are arith-only; point at a local model, so the data set is what fails
        model = save_model(tmp_path / "model", tiny_model, tiny_tokenizer)
        args = [*args, f"model.name_or_path={model}", f"teacher.name_or_path={model}"]
    out = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", "logger=none")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), out.stderr


# --------------------------------------------------------------------------- samples and W&B settings


@pytest.mark.integration
def test_two_steps_write_samples_of_training_and_evaluation(tmp_path, models_dir):
    """samples.jsonl after a 2-step run (samples every step, every token kept): the responses of the
    evaluations (steps 0 and 2) and of each training step, as the student's tokenizer decodes their
    tokens and with the checker's verdict; the same rows go to the offline W&B run's table. The
    diagnostics every second step: metrics.jsonl has them on step 2 only."""
    from transformers import AutoTokenizer

    from opd_cli.tasks.checking import make_checker

    run = tmp_path / "samples"
    args = ["trainer.max_steps=2", "logger.samples_every=1", "logger.samples_tokens=64", "logger.diagnostics_every=2"]
    opd_train(run, models_dir, *args)
    # logger.diagnostics_every=2: the student's diagnostics on step 2 only (the loss on both)
    trained = {r["step"]: r for r in metrics(run) if "loss" in r}
    assert "entropy" not in trained[1] and "logprob_gap" not in trained[1] and "loss" in trained[1]
    assert "entropy" in trained[2] and "logprob_gap" in trained[2]
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    phases = [(0, "eval_teacher"), (0, "eval"), (1, "train"), (2, "train"), (2, "eval")]
    # logger.samples_per_step: 4 (4 prompts x rollout.n=2 per step: one response of each prompt)
    assert [(r["step"], r["phase"]) for r in rows] == [p for p in phases for _ in range(4)]
    assert len({r["prompt"] for r in rows if r["step"] == 1}) == 4
    tokenizer = AutoTokenizer.from_pretrained(run / "checkpoints/step_000002/model")
    checker = make_checker(compose_cfg().task)
    for r in rows:
        assert tokenizer.decode(r["token_ids"], skip_special_tokens=True) == r["response"]
        assert r["correct"] == checker(r["response"], r["answer"])
        # the model that sampled has log-probs; the teacher also scored the training rollouts
        sampler = "teacher" if r["phase"] == "eval_teacher" else "student"
        other = {"teacher": "student", "student": "teacher"}[sampler]
        assert r["length"] == len(r["token_ids"]) == len(r[f"{sampler}_logprobs"]) <= 24
        assert r[f"{sampler}_logprob_mean"] == pytest.approx(sum(r[f"{sampler}_logprobs"]) / r["length"])
        if r["phase"] == "train":
            assert r["teacher_logprob_mean"] == pytest.approx(sum(r["teacher_logprobs"]) / r["length"])
        else:
            assert r[f"{other}_logprob_mean"] is None and r[f"{other}_logprobs"] is None
    tables = list((run / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 5  # one per samples call: 0 (teacher), 0 (student), 1, 2 (train), 2 (eval)


@pytest.mark.integration
def test_wandb_mode_disabled_writes_no_wandb_run(tmp_path, models_dir):
    """logger=wandb leaves logger.mode null: WANDB_MODE=disabled in the environment means no W&B run."""
    run = tmp_path / "run"
    args = ["trainer.max_steps=1", "eval.n_problems=4", "eval.k=1", "logger.samples_every=0"]
    opd_train(run, models_dir, *args, env={"WANDB_MODE": "disabled"})
    assert [r["step"] for r in metrics(run)] == [0, 1]
    assert not (run / "wandb").exists() and not (run / "wandb_run_id").exists()
    assert not (run / "samples.jsonl").exists()  # logger.samples_every=0: no samples


@pytest.mark.unit
def test_sweep_jobs_are_named_by_their_overrides():
    from opd_cli.commands.train import sweep_logging

    cfg = compose_cfg().logger  # name, group and tags null
    overrides = ["loss.k=4", "hydra.verbose=true"]
    # a single run: nothing set here (W&B takes the run directory's name later)
    assert sweep_logging(cfg, {}, False, "outputs/sweeps/s1", "loss.k=4", overrides) == (None, None, None)
    name, group, tags = sweep_logging(cfg, {}, True, "outputs/sweeps/s1", "loss.k=4", overrides)
    assert (name, group, tags) == ("s1/loss.k=4", "outputs/sweeps/s1", ["loss.k=4"])
    # a WANDB_* variable leaves the key null, so that it applies; WANDB_TAGS are kept and the overrides added
    env = {"WANDB_NAME": "mine", "WANDB_RUN_GROUP": "g", "WANDB_TAGS": "t"}
    assert sweep_logging(cfg, env, True, "outputs/sweeps/s1", "loss.k=4", overrides) == (None, None, ["t", "loss.k=4"])
    # values set in the config are kept
    cfg = compose_cfg(["logger.name=n", "logger.group=g", "logger.tags=['loss.k=4']"]).logger
    assert sweep_logging(cfg, env, True, "outputs/sweeps/s1", "loss.k=4", overrides) == ("n", "g", ["loss.k=4"])
