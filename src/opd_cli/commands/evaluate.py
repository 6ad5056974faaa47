"""``opd-eval``: one model on several benchmarks, sampled and scored the way the papers do.

For each benchmark in ``tasks``: ``eval.k`` samples per problem, avg@k, unbiased
pass@k for each ``pass_k``, and, given ``teacher_acc`` and ``baseline_acc``, the gap
recovery rate. Writes ``eval.json`` and ``eval.md`` (the scores and the sampling settings) and
``generations.jsonl`` (every sampled response and its verdict) in the Hydra run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from opd_cli.commands.app import CONF_DIR, run_app
from opd_cli.config.validate import validate_evaluate
from opd_cli.dist import Rank, pick_device
from opd_cli.errors import one_line_errors
from opd_cli.models.loading import load_tokenizer, resolve_path
from opd_cli.rollout.registry import model_sampler
from opd_cli.tasks.checking import make_checker
from opd_cli.tasks.problems import Problem, load_problems, task_config
from opd_cli.tasks.prompts import format_prompt
from opd_cli.tasks.scores import avg_at_k, gap_recovery, mean_pass_at_k
from opd_cli.training.data import prompt_length
from opd_cli.training.evaluation import sample_correctness
from opd_cli.training.samples import Recording


def run(cfg, out_dir: Path) -> dict:
    """Evaluate as configured; returns (and writes) the results per benchmark."""
    validate_evaluate(cfg, list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [])
    torch.manual_seed(cfg.seed)
    tasks = {name: task_config(name, cfg.task_paths.get(name), "tasks", f"task_paths.{name}") for name in cfg.tasks}
    path = resolve_path(cfg.model.name_or_path, cfg)
    tok = load_tokenizer(path, "model.name_or_path", cfg.model.trust_remote_code)
    benchmarks = {}
    for name, tcfg in tasks.items():
        if cfg.chat_template is not None:
            tcfg.chat_template = cfg.chat_template
        key = f"task_paths.{name}"
        problems = load_problems(tcfg, key, key)[1][: cfg.eval.n_problems]
        # the top-level chat_template is the key that asks for it here
        benchmarks[name] = (tcfg, problems, [format_prompt(p, tcfg, tok, "chat_template") for p in problems])
    longest = max(prompt_length(tok, p) for *_, prompts in benchmarks.values() for p in prompts)
    max_len = longest + cfg.eval.max_new_tokens
    mc, device = cfg.model, pick_device(cfg.device, Rank())
    sampler = model_sampler(
        cfg.rollout, path, "model.name_or_path", mc.dtype, mc.trust_remote_code, tok, device, max_len, cfg.seed
    )
    results, generations = {}, []
    for name, (tcfg, problems, prompts) in benchmarks.items():
        recording = Recording(sampler)
        correct = sample_correctness(recording, problems, prompts, make_checker(tcfg), cfg.eval, cfg.seed, name)
        generations += generation_rows(name, problems, prompts, recording, correct)
        row = {"n_problems": len(problems), "k": cfg.eval.k, f"avg@{cfg.eval.k}": avg_at_k(correct)}
        row.update({f"pass@{k}": mean_pass_at_k(correct, k) for k in cfg.pass_k})
        if cfg.teacher_acc.get(name) is not None and cfg.baseline_acc.get(name) is not None:
            row["gap_recovery"] = gap_recovery(row[f"avg@{cfg.eval.k}"], cfg.teacher_acc[name], cfg.baseline_acc[name])
        results[name] = row
    write_results(out_dir, cfg.model.name_or_path, results, sampling_settings(cfg))
    write_generations(out_dir, generations)
    return results


def sampling_settings(cfg) -> dict:
    """How the responses were sampled, recorded with the scores."""
    e = cfg.eval
    return {
        "model": cfg.model.name_or_path,
        "engine": cfg.rollout.engine,
        "k": e.k,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "max_new_tokens": e.max_new_tokens,
        "seed": cfg.seed,
    }


def generation_rows(
    benchmark: str, problems: list[Problem], prompts: list[str], recording: Recording, correct: list[list[bool]]
) -> list[dict]:
    """One row per sampled response of a benchmark: which problem (its index, question and gold answer),
    which of its samples, the response as the checker read it, and the verdict."""
    if recording.prompts != prompts:  # the evaluation sampled the problems in order, each once
        raise RuntimeError("opd-eval: the recorded generations do not follow the benchmark's problems")
    k = len(correct[0]) if correct else 0
    return [
        {
            "benchmark": benchmark,
            "problem": i,
            "question": p.question,
            "answer": p.answer,
            "sample": j,
            "response": recording.texts[i * k + j],
            "correct": ok,
        }
        for i, (p, verdicts) in enumerate(zip(problems, correct, strict=True))
        for j, ok in enumerate(verdicts)
    ]


def write_generations(out_dir: Path, rows: list[dict]) -> None:
    (out_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_results(out_dir: Path, model: str, results: dict, settings: dict) -> None:
    data = {"model": model, "settings": settings, "results": results}
    (out_dir / "eval.json").write_text(json.dumps(data, indent=2) + "\n")
    keys = sorted({k for row in results.values() for k in row}, key=lambda k: (k != "n_problems", k != "k", k))
    sampled = ", ".join(f"{k} {v}" for k, v in settings.items() if k != "model")
    lines = [f"# Evaluation of {model}", "", f"Sampling: {sampled}.", ""]
    lines += ["| benchmark | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{row[k]:.4f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out_dir / "eval.md").write_text("\n".join(lines) + "\n")


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with one_line_errors():
        results = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    print(json.dumps(results, indent=2))


def main() -> None:
    run_app(_hydra_main)


if __name__ == "__main__":
    main()
