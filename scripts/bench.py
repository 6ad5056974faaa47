"""Benchmark (make bench): objective microbenchmarks, and one OPD step of opd-cli beside TRL's.

    python scripts/bench.py [--steps 10 --warmup 3 --rounds 3 --losses topk_lsm,full_rkl --out outputs/bench]
    python scripts/bench.py -- trainer.cpu_linear=blas ...   (Hydra overrides after --, both engines)

The step: the demo student samples ``rollout.n`` answers to each of
``trainer.prompts_per_step`` training prompts (the prompts ``opd-train`` would use at
those steps), the demo teacher scores them, and the student takes one optimizer step.

- opd-cli: ``opd_cli.training.build.build`` + ``opd_step``, exactly as ``opd-train`` runs them,
  once per objective in ``--losses``. Phases come from the step's own ``time/*`` metrics.
- TRL: ``trl.DistillationTrainer`` (on-policy: ``beta=1``, the full-vocabulary reverse KL,
  the same divergence as opd-cli's ``full_rkl``) with the same models, prompts, batch
  (one generation batch = one optimizer step of ``prompts_per_step * n`` sequences), max
  new tokens, temperature, top-p, learning rate, clipping and seed. Each prompt is listed
  ``n`` times, as TRL samples one answer per row. fp32 and no gradient checkpointing on
  both sides (TRL's bf16 and checkpointing defaults only slow a CPU step down).
  Phases are read from TRL's own methods: ``_generate`` (rollout), the teacher's
  ``_get_last_hidden_state`` call (teacher), the optimizer callbacks (optimizer); the rest
  of the step (student forward, projection, loss, backward, Trainer overhead) is "student".
- Both sides' models are loaded by ``opd_cli.models.loading.load_model`` with the same
  ``trainer.cpu_linear``, so their linear layers run on the same kernels (oneDNN on an
  x86-64 CPU by default): the ratio is not a kernel library's.

Every engine runs in a fresh child process (its own peak memory, no shared warm caches);
each runs ``--warmup`` untimed steps, then ``--steps`` timed ones. The engines take turns
for ``--rounds`` rounds and each keeps its fastest round, so a noisy moment on a shared
machine does not decide the ratio. Tokens/s is response
tokens (EOS included) over wall time, summed over the timed steps. Writes ``bench.json``
and ``bench.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
from opd_cli.training.loop import PHASES

ROOT = Path(__file__).resolve().parent.parent


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from opd_cli.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=["logger=none", *overrides])


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_prompts_for(cfg, train_prompts: list[str], steps: int) -> list[list[str]]:
    from opd_cli.training.data import step_prompts

    per, seed = cfg.trainer.prompts_per_step, cfg.trainer.seed
    return [step_prompts(train_prompts, per, s, seed) for s in range(1, steps + 1)]


def opd_worker(args, overrides: list[str], rollout=None) -> dict:
    """Time opd-cli's step with ``overrides`` (one objective); ``rollout``: an engine to use in place of
    the configured one (bench_scale.py's fixed responses)."""
    import torch

    from opd_cli.dist import Rank, pick_device
    from opd_cli.tasks.problems import load_problems
    from opd_cli.training.build import build
    from opd_cli.training.loop import opd_step

    cfg = compose(overrides)
    torch.manual_seed(cfg.trainer.seed)
    rank = Rank()
    device = pick_device(cfg.trainer.device, rank)
    train_problems, eval_problems = load_problems(cfg.task)
    parts = build(cfg, rank, device, None, train_problems, eval_problems[:1])
    if rollout is not None:
        parts.rollout = rollout
    steps = []
    for i, prompts in enumerate(step_prompts_for(cfg, parts.train_prompts, args.warmup + args.steps)):
        m = opd_step(i + 1, prompts, parts, cfg, rank)
        if i >= args.warmup:
            tokens = m["response_length"] * len(prompts) * cfg.rollout.n
            steps.append({"tokens": tokens, "time_s": m["step_time_s"], **{p: m[f"time/{p}_s"] for p in PHASES}})
    return {"engine": f"opd-cli {cfg.loss.name}", "steps": steps, "peak_mem_gb": peak_rss_gb()}


def trl_worker(args, overrides: list[str], fixed: tuple[list, list] | None = None) -> dict:
    """Time TRL's DistillationTrainer on the same step; ``fixed``: (prompt ids, completion ids) per row,
    returned in place of TRL's sampling (``fixed_generate``)."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from opd_cli.config.validate import student_precision
    from opd_cli.models.loading import load_model, load_tokenizer, resolve_path
    from opd_cli.tasks.problems import load_problems
    from opd_cli.training.data import training_prompts

    cfg = compose(overrides)
    tc, rc = cfg.trainer, cfg.rollout
    s_path, t_path = resolve_path(cfg.model.name_or_path, cfg), resolve_path(cfg.teacher.name_or_path, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16-mixed as opd-train runs it: float32 weights and optimizer state, bfloat16 compute (TRL's bf16=True
    # autocasts); bf16-pure: bfloat16 weights stepped directly
    precision = student_precision(cfg)
    s_dtype = "float32" if precision == "bf16-mixed" else cfg.model.dtype
    student = load_model(s_path, "model.name_or_path", s_dtype, device, cpu_linear=tc.cpu_linear)
    teacher = load_model(t_path, "teacher.name_or_path", cfg.teacher.dtype, device, cpu_linear=tc.cpu_linear)
    tok = load_tokenizer(s_path, "model.name_or_path")
    tok.padding_side = "left"
    train_prompts, _ = training_prompts(load_problems(cfg.task)[0], cfg, tok)
    total = args.warmup + args.steps
    rows = [p for step in step_prompts_for(cfg, train_prompts, total) for p in step for _ in range(rc.n)]
    batch = tc.prompts_per_step * rc.n
    targs = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=total,
        learning_rate=tc.lr,
        lr_scheduler_type="constant",
        weight_decay=tc.weight_decay,
        adam_beta1=tc.betas[0],
        adam_beta2=tc.betas[1],
        max_grad_norm=tc.max_grad_norm,
        beta=1.0,
        temperature=rc.temperature,
        top_p=rc.top_p,
        top_k=0,
        max_completion_length=rc.max_new_tokens,
        bf16=precision == "bf16-mixed",
        gradient_checkpointing=tc.gradient_checkpointing,
        shuffle_dataset=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=tc.seed,
        use_cpu=device.type == "cpu",
    )
    phases = {p: [0.0] * total for p in PHASES}
    ends, lengths = [], []

    def now() -> float:  # queued GPU work is charged to the phase that queued it
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(now())

        def on_pre_optimizer_step(self, *a, **k):
            self.t = now()

        def on_optimizer_step(self, *a, **k):
            phases["optimizer"][len(ends) - 1] += now() - self.t

        def on_step_end(self, *a, **k):
            ends.append(now())

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=targs, train_dataset=Dataset.from_dict({"prompt": rows}),
        processing_class=tok, callbacks=[Clock()],
    )  # fmt: skip

    def timed(name, fn, when=lambda *a, **k: True):
        def wrapper(*a, **k):
            t0 = now()
            out = fn(*a, **k)
            if when(*a, **k):
                phases[name][len(ends) - 1] += now() - t0
            return out

        return wrapper

    if fixed is not None:
        trainer._generate = fixed_generate(trainer, *fixed)
    trainer._generate = timed("rollout", trainer._generate)
    trainer._get_last_hidden_state = timed(
        "teacher", trainer._get_last_hidden_state, when=lambda model, *a, **k: model is trainer.teacher_model
    )
    trainer.train()
    steps = []
    for i in range(args.warmup, total):
        t = ends[i + 1] - ends[i]
        row = {p: phases[p][i] for p in PHASES}
        row["student"] = t - row["rollout"] - row["teacher"] - row["optimizer"]
        steps.append({"tokens": lengths[i] * batch, "time_s": t, **row})
    return {"engine": "TRL DistillationTrainer (beta=1)", "steps": steps, "peak_mem_gb": peak_rss_gb()}


def fixed_generate(trainer, prompt_ids: list[list[int]], completion_ids: list[list[int]]):
    """A stand-in for ``DistillationTrainer._generate`` that returns fixed token ids (no sampling) and logs
    the completion length as TRL's own does (``completions/mean_length``)."""
    length = sum(map(len, completion_ids)) / len(completion_ids)

    def generate(prompts):
        assert len(prompts) == len(prompt_ids), (len(prompts), len(prompt_ids))
        trainer._metrics["train"]["completions/mean_length"].append(length)
        return prompt_ids, completion_ids, None, None, []

    return generate


def objective_rows(args) -> list[dict]:
    """The gathered-vs-dense topk_lsm microbenchmark (scripts/bench_topk_lsm.py), each path in its own process."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_topk_lsm import measure

    return list(measure(args.objective_args.split()).values())


def summarize(result: dict) -> dict:
    steps = result["steps"]
    time_s = sum(s["time_s"] for s in steps)
    tokens = sum(s["tokens"] for s in steps)
    phases = {p: sum(s[p] for s in steps) / len(steps) for p in PHASES}
    return {**result, "tokens": tokens, "time_s": time_s, "tokens_per_s": tokens / time_s, "phase_s": phases}


def markdown(report: dict) -> str:
    out = [f"# make bench ({report['machine']})", "", f"Command: `{report['command']}`", "", report["setting"], ""]
    out += ["## One OPD step", "", "| engine | tokens/s | step s | " + " | ".join(PHASES) + " | peak GB |"]
    out.append("|---" * (len(PHASES) + 4) + "|")
    for r in report["engines"]:
        cells = " | ".join(f"{r['phase_s'][p]:.3f}" for p in PHASES)
        step = r["time_s"] / len(r["steps"])
        out.append(f"| {r['engine']} | {r['tokens_per_s']:,.0f} | {step:.3f} | {cells} | {r['peak_mem_gb']:.2f} |")
    out += [""] + [f"- {line}" for line in report["ratios"]]
    if report["objectives"]:
        out += [
            "",
            "## topk_lsm objective, forward + backward",
            "",
            "| path | time s | extra peak MiB |",
            "|---|---|---|",
        ]
        for r in report["objectives"]:
            out.append(f"| {r['path']} | {r['time_s']:.3f} | {r['extra_peak_bytes'] / 2**20:.1f} |")
    return "\n".join(out) + "\n"


def machine() -> str:
    """The machine line of a report: CPUs, torch threads and version, the GPU if any."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}{gpu}"


def child(args, what: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", what, f"--steps={args.steps}", f"--warmup={args.warmup}", "--"]
    proc = subprocess.run(cmd + overrides, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"bench: the {what} worker failed:\n{proc.stderr[-3000:]}")
    return summarize(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per engine")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=3, help="runs per engine, alternating; the fastest is kept")
    ap.add_argument("--losses", default="topk_lsm,full_rkl", help="opd-cli objectives to time (loss presets)")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL (e.g. at shapes TRL cannot run)")
    ap.add_argument("--objective-args", default="", help="arguments for bench_topk_lsm.py; 'skip' skips it")
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--worker", choices=["opd", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both engines (after --)")
    args = ap.parse_args()
    if args.worker:
        fn = opd_worker if args.worker == "opd" else trl_worker
        print(json.dumps(fn(args, args.overrides)))
        return

    from opd_cli.models.loading import resolve_path

    cfg = compose(args.overrides)
    resolve_path(cfg.model.name_or_path, cfg), resolve_path(cfg.teacher.name_or_path, cfg)  # build the demo models
    jobs = [("opd", [f"loss={name}", *args.overrides]) for name in args.losses.split(",")]
    jobs += [] if args.no_trl else [("trl", args.overrides)]
    best: list[dict | None] = [None] * len(jobs)
    for _ in range(args.rounds):  # rounds alternate the engines; each keeps its fastest round
        for i, (what, overrides) in enumerate(jobs):
            r = child(args, what, overrides)
            if best[i] is None or r["tokens_per_s"] > best[i]["tokens_per_s"]:
                best[i] = r
    engines = best
    ratios = []
    if not args.no_trl:
        trl = engines[-1]
        for r in engines[:-1]:
            ratios.append(f"{r['engine']} / TRL: **{r['tokens_per_s'] / trl['tokens_per_s']:.2f}x** tokens/s")
    rc, tc = cfg.rollout, cfg.trainer
    report = {
        "machine": machine(),
        "command": " ".join(["python scripts/bench.py", *sys.argv[1:]]),
        "setting": f"{cfg.model.name_or_path} <- {cfg.teacher.name_or_path}, {tc.prompts_per_step} prompts x "
        f"{rc.n} samples, max {rc.max_new_tokens} new tokens, temperature {rc.temperature}, top-p {rc.top_p}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, best of {args.rounds} alternating rounds, "
        f"trainer.cpu_linear={tc.cpu_linear} on both sides; "
        "phases are seconds per step",
        "engines": engines,
        "ratios": ratios,
        "objectives": [] if args.objective_args == "skip" else objective_rows(args),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
