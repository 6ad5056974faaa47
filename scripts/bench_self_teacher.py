"""Memory of the self-teacher (teacher=self): a frozen copy of the starting weights against the live weights.

    python scripts/bench_self_teacher.py [--hidden 1024 --layers 8 --steps 2 --out outputs/bench-self]

Builds a randomly initialised Qwen2 student of the given shape with the demo tokenizer (saved under
``--out``), then runs ``opd-train`` on it for ``--steps`` steps with ``teacher=self`` and a privileged
system prompt, once per ``teacher.self_weights``, each in its own process, and reads the run's
``peak_mem_gb`` (the process's peak resident set on a CPU, GPU memory on CUDA). The live teacher
scores with the trained model itself, so its peak should be lower by about one copy of the weights
at ``teacher.dtype``. Writes ``self_teacher.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]


def build_student(out: Path, hidden: int, layers: int) -> tuple[Path, int]:
    """A random Qwen2 of ``hidden`` x ``layers`` with the demo's tokenizer recipe, saved under ``out``."""
    from opd_cli.dist import save_pretrained
    from opd_cli.models.demo import build_model, train_tokenizer
    from opd_cli.tasks.problems import arith_problems

    path = out / f"student-{hidden}x{layers}"
    texts = [f"Question: {p.question}\nAnswer: {p.solution}" for p in arith_problems(0, "train", 256)[:2000]]
    tokenizer = train_tokenizer(texts, 400)
    model = build_model(tokenizer, SimpleNamespace(hidden_size=hidden, num_layers=layers, seed=0))
    save_pretrained(model, path)
    tokenizer.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def run(student: Path, weights: str, steps: int, run_dir: Path) -> dict:
    args = [
        f"model.name_or_path={student}", "teacher=self", f"teacher.self_weights={weights}",
        "teacher.prompt.system=Add the tens first.", f"trainer.max_steps={steps}", "trainer.save_every=0",
        "eval.n_problems=8", "eval.k=1", "trainer.prompts_per_step=8", "rollout.n=2", "logger=none",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    start = time.time()
    subprocess.run([sys.executable, "-m", "opd_cli.commands.train", *args], cwd=REPO, check=True,
                   capture_output=True, text=True)  # fmt: skip
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    peak = max(r.get("peak_mem_gb", 0.0) for r in rows)
    return {"weights": weights, "peak_mem_gb": peak, "wall_s": round(time.time() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench-self")
    a = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    student, params = build_student(a.out, a.hidden, a.layers)
    results = [run(student, w, a.steps, a.out / f"{stamp}-{w}") for w in ("initial", "live")]
    report = {"params": params, "weights_gb_fp32": params * 4 / 2**30, "runs": results}
    report["saved_gb"] = results[0]["peak_mem_gb"] - results[1]["peak_mem_gb"]
    (a.out / "self_teacher.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
