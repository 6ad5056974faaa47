"""``opd-eval``: one model on several benchmarks, sampled and scored the way the papers do.

For each benchmark in ``tasks``: ``eval.k`` samples per problem, avg@k, unbiased
pass@k for each ``pass_k``, and, given ``teacher_acc`` and ``baseline_acc``, the gap
recovery rate. Writes ``eval.json`` and ``eval.md`` in the Hydra run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from opd_cli.commands.app import CONF_DIR, run_app
from opd_cli.dist import Rank, pick_device
from opd_cli.errors import UserError, one_line_errors
from opd_cli.models.loading import load_model, load_tokenizer, resolve_path
from opd_cli.models.vllm import make_llm
from opd_cli.rollout.hf import HFRollout
from opd_cli.rollout.vllm import VLLMRollout
from opd_cli.tasks.checking import make_checker
from opd_cli.tasks.problems import load_problems, task_config
from opd_cli.tasks.prompts import format_prompt
from opd_cli.tasks.scores import avg_at_k, gap_recovery, mean_pass_at_k
from opd_cli.training.evaluation import sample_correctness


def check(cfg) -> None:
    if not cfg.tasks:
        raise UserError("tasks: give at least one benchmark, e.g. tasks=[aime24,math500]")
    if cfg.eval.k < 1 or cfg.eval.n_problems < 1 or cfg.eval.max_new_tokens < 1:
        raise UserError("eval: k, n_problems and max_new_tokens must be >= 1")
    if not 0 < cfg.eval.top_p <= 1:
        raise UserError(f"eval.top_p: must be in (0, 1], got {cfg.eval.top_p}")
    for k in cfg.pass_k:
        if not 1 <= k <= cfg.eval.k:
            raise UserError(f"pass_k: {k} must be between 1 and eval.k ({cfg.eval.k})")


def run(cfg, out_dir: Path) -> dict:
    """Evaluate as configured; returns (and writes) the results per benchmark."""

    check(cfg)
    torch.manual_seed(cfg.seed)
    # bad names fail first
    tasks = {name: task_config(name, cfg.task_paths.get(name), "tasks", f"task_paths.{name}") for name in cfg.tasks}
    path = resolve_path(cfg.model.name_or_path, cfg)
    tok = load_tokenizer(path, "model.name_or_path", cfg.model.trust_remote_code)
    benchmarks = {}
    for name, tcfg in tasks.items():
        if cfg.chat_template is not None:
            tcfg.chat_template = cfg.chat_template
        problems = load_problems(tcfg)[1][: cfg.eval.n_problems]
        benchmarks[name] = (tcfg, problems, [format_prompt(p, tcfg, tok) for p in problems])
    if cfg.rollout.engine == "vllm":
        longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for *_, ps in benchmarks.values() for p in ps)
        llm = make_llm(
            path,
            cfg.model.dtype,
            longest + cfg.eval.max_new_tokens,
            20,
            cfg.rollout.gpu_memory_utilization,
            cfg.seed,
            ranks=False,
        )
        sampler = VLLMRollout(llm, tok)
    else:
        device = pick_device(cfg.device, Rank())
        model = load_model(path, "model.name_or_path", cfg.model.dtype, device, cfg.model.trust_remote_code)
        sampler = HFRollout(model, tok)
    results = {}
    for name, (tcfg, problems, prompts) in benchmarks.items():
        correct = sample_correctness(sampler, problems, prompts, make_checker(tcfg), cfg.eval, cfg.seed)
        row = {"n_problems": len(problems), "k": cfg.eval.k, f"avg@{cfg.eval.k}": avg_at_k(correct)}
        row.update({f"pass@{k}": mean_pass_at_k(correct, k) for k in cfg.pass_k})
        if cfg.teacher_acc.get(name) is not None and cfg.baseline_acc.get(name) is not None:
            row["gap_recovery"] = gap_recovery(row[f"avg@{cfg.eval.k}"], cfg.teacher_acc[name], cfg.baseline_acc[name])
        results[name] = row
    write_results(out_dir, cfg.model.name_or_path, results)
    return results


def write_results(out_dir: Path, model: str, results: dict) -> None:
    (out_dir / "eval.json").write_text(json.dumps({"model": model, "results": results}, indent=2) + "\n")
    keys = sorted({k for row in results.values() for k in row}, key=lambda k: (k != "n_problems", k != "k", k))
    lines = [f"# Evaluation of {model}", "", "| benchmark | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
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
