"""avg@k of a sampling engine on held-out problems and benchmarks (``opd-train`` and ``opd-eval``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from opd_cli.batch import chunk_bounds
from opd_cli.progress import Progress
from opd_cli.tasks.checking import Checker, make_checker
from opd_cli.tasks.problems import Problem, load_problems, task_config
from opd_cli.tasks.prompts import format_prompt
from opd_cli.tasks.scores import avg_at_k


class Benchmark(NamedTuple):
    """A benchmark scored during training (``eval.benchmarks``): its problems, their prompts, its checker."""

    problems: list[Problem]
    prompts: list[str]
    checker: Checker


@torch.no_grad()
def sample_graded(
    engine, problems: list[Problem], prompts: list[str], checker, ecfg, seed: int, desc: str = "eval"
) -> tuple[list[list[bool]], list[str]]:
    """Correctness of ``eval.k`` samples per problem from a sampling engine (``[problem][sample]``) and
    every response's text, in the same order, flat.

    Rank 0 shows its progress (``opd_cli.progress``, labelled ``desc``) after each call of
    ``eval.batch_size`` samples, with the accuracy so far.
    """
    out: list[list[bool]] = []
    every: list[str] = []
    per_call = max(1, ecfg.batch_size // ecfg.k)
    with Progress(len(problems) * ecfg.k, desc, unit="samples") as bar:
        for s, e in chunk_bounds(len(problems), per_call):
            batch = engine.generate(prompts[s:e], ecfg.k, ecfg.temperature, ecfg.top_p, ecfg.max_new_tokens, seed + s)
            texts = engine.decode_responses(batch)
            every.extend(texts)
            for i in range(e - s):
                out.append([checker(t, problems[s + i].answer) for t in texts[i * ecfg.k : (i + 1) * ecfg.k]])
            bar.update((e - s) * ecfg.k, acc=f"{avg_at_k(out):.3f}")
    return out, every


def sample_correctness(
    engine, problems: list[Problem], prompts: list[str], checker, ecfg, seed: int, desc: str = "eval"
) -> list[list[bool]]:
    """Correctness of ``eval.k`` samples per problem from a sampling engine: ``[problem][sample]``."""
    return sample_graded(engine, problems, prompts, checker, ecfg, seed, desc)[0]


def pattern_rates(texts: Sequence[str], patterns: Mapping[str, str]) -> dict[str, float]:
    """Per ``eval.patterns`` name, the share of ``texts`` its regular expression matches (``re.search``)."""
    return {
        name: sum(re.search(regex, t) is not None for t in texts) / max(1, len(texts))
        for name, regex in patterns.items()
    }


def evaluate_patterns(
    engine,
    problems: list[Problem],
    prompts: list[str],
    checker,
    ecfg,
    seed: int,
    desc: str = "eval",
    patterns: Mapping[str, str] | None = None,
) -> tuple[float, dict[str, float]]:
    """avg@k accuracy of a sampling engine and, per ``patterns`` name, the share of its responses the
    regular expression matches (``pattern_rates``) over the same samples."""
    correct, texts = sample_graded(engine, problems, prompts, checker, ecfg, seed, desc)
    return avg_at_k(correct), pattern_rates(texts, patterns or {})


def evaluate(
    engine, problems: list[Problem], prompts: list[str], checker, ecfg, seed: int, desc: str = "eval"
) -> float:
    """avg@k accuracy of a sampling engine: mean correctness over ``eval.k`` samples per problem.

    Every rank evaluates the same problems with the same seeds (so ZeRO-3 ranks run
    the same forward passes); rank 0 reports.
    """
    return avg_at_k(sample_correctness(engine, problems, prompts, checker, ecfg, seed, desc))


def load_benchmarks(cfg, tokenizer) -> dict[str, Benchmark]:
    """The ``eval.benchmarks`` tasks: problems, prompts, checker.

    Prompts take the training task's template and chat template settings, so the policy is
    scored under the prompt it is trained on (as the papers evaluate during training).
    """
    out = {}
    for name in cfg.eval.benchmarks:
        path = cfg.eval.benchmark_paths.get(name)
        tcfg = task_config(name, path, "eval.benchmarks", f"eval.benchmark_paths.{name}")
        for key in ("template", "chat_template", "chat_template_kwargs"):
            tcfg[key] = cfg.task[key]
        problems = load_problems(tcfg)[1][: cfg.eval.n_problems]
        out[name] = Benchmark(problems, [format_prompt(p, tcfg, tokenizer) for p in problems], make_checker(tcfg))
    return out
