"""``opd-data <name> [overrides]``: data sets made with the models: ``teacher-rollouts``, ``aligned-prompts``.

``teacher-rollouts``: the teacher samples ``data.n`` responses to each training prompt of the task
(``rollout.engine`` samples it, HF or vLLM); the truncated, repetitive and (``data.drop_incorrect``)
wrong ones are dropped (``training/teacher_rollouts.py``), and the rest is written as a
``datasets.Dataset`` (``<run dir>/data``, one row per kept response) with ``stats.json`` beside it.

``aligned-prompts``: the task's training problems most like the teacher's post-training prompts
(``reference.path``), by sentence-embedding similarity (``tasks/alignment.py``): ``problems.jsonl`` (the
kept rows in the task's layout, for ``task.mix`` or ``task.path``), ``scores.jsonl`` and ``stats.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from opd_cli.batch import chunk_bounds
from opd_cli.commands.app import CONF_DIR, run_app
from opd_cli.config.validate import validate_aligned, validate_data
from opd_cli.dist import Rank, pick_device
from opd_cli.errors import UserError, fail, one_line_errors
from opd_cli.models.loading import load_tokenizer, resolve_path
from opd_cli.progress import Progress
from opd_cli.rollout.registry import model_sampler
from opd_cli.tasks import alignment
from opd_cli.tasks.checking import make_checker
from opd_cli.tasks.problems import Problem, load_problems
from opd_cli.tasks.prompts import format_prompt
from opd_cli.training.data import prompt_length
from opd_cli.training.teacher_rollouts import (
    DROP_REASONS,
    Sample,
    batch_samples,
    drop_reason,
    incorrect,
    repetitive,
    summary,
    truncated,
    without_eos,
)

COMMANDS = ("teacher-rollouts", "aligned-prompts")
# the data set's columns (docs/design.md, "Teacher rollouts (opd-data)")
COLUMNS = ("question", "answer", "response", "response_tokens", "correct", "problem", "sample")
# what to change when every response was dropped for a reason
REMEDY = {
    "truncated": "raise data.max_new_tokens",
    "repetitive": "raise data.max_repeat_fraction",
    "incorrect": "set data.drop_incorrect=false",
}


def teacher_prompts(problems: list[Problem], cfg, tokenizer) -> tuple[list[int], list[str], int]:
    """The indices and prompts (task template and chat template, with the teacher's tokenizer) of the
    problems whose prompt fits ``rollout.max_prompt_tokens`` (as opd-train leaves the longer ones out),
    and the longest length kept."""
    prompts = [format_prompt(p, cfg.task, tokenizer) for p in problems]
    lengths = [prompt_length(tokenizer, p) for p in prompts]
    index = [i for i, n in enumerate(lengths) if n <= cfg.rollout.max_prompt_tokens]
    if not index:
        raise UserError("rollout.max_prompt_tokens: every training prompt is longer than this")
    return index, [prompts[i] for i in index], max(lengths[i] for i in index)


def judge(s: Sample, problem: Problem, tokenizer, checker, d) -> tuple[dict, str | None]:
    """A sample's data set row and its drop reason (None: kept)."""
    eos = tokenizer.eos_token_id
    body = without_eos(s.tokens, eos)
    text = tokenizer.decode(body, skip_special_tokens=True)
    correct = checker(text, problem.answer) if problem.answer else None
    row = {"question": problem.question, "answer": problem.answer, "response": text}
    row |= {"response_tokens": len(body), "correct": correct, "problem": s.problem, "sample": s.sample}
    why = drop_reason(
        truncated(s.tokens, eos, d.max_new_tokens),
        repetitive(body, d.repeat_ngram, d.max_repeat_fraction),
        incorrect(correct, d.drop_incorrect),
    )
    return row, why


def sample_and_judge(engine, index, prompts, problems, tokenizer, checker, d, seed) -> tuple[list[dict], list]:
    """Every sample's row and drop reason, ``data.batch_size`` sequences per call of the engine (the
    call's seed: ``seed`` plus its first prompt's position)."""
    rows, reasons = [], []
    per_call = max(1, d.batch_size // d.n)
    with Progress(len(prompts) * d.n, "teacher-rollouts", unit="samples") as bar:
        for s, e in chunk_bounds(len(prompts), per_call):
            batch = engine.generate(prompts[s:e], d.n, d.temperature, d.top_p, d.max_new_tokens, seed + s)
            for sample in batch_samples(batch, index[s:e], d.n):
                row, why = judge(sample, problems[sample.problem], tokenizer, checker, d)
                rows.append(row)
                reasons.append(why)
            bar.update((e - s) * d.n, kept=reasons.count(None))
    return rows, reasons


def settings(cfg) -> dict:
    """How the data set was made, recorded in ``stats.json``."""
    return {
        "teacher": cfg.teacher.name_or_path,
        "engine": cfg.rollout.engine,
        "task": cfg.task.path or cfg.task.dataset or cfg.task.name,
        "seed": cfg.seed,
        **{k: v for k, v in cfg.data.items()},
    }


def run(cfg, out_dir: Path, overrides: list[str] = ()) -> dict:
    """Sample, filter and write the data set as configured; returns (and writes) ``stats.json``'s content."""
    validate_data(cfg, overrides)
    torch.manual_seed(cfg.seed)
    d = cfg.data
    path = resolve_path(cfg.teacher.name_or_path, cfg)
    tok = load_tokenizer(path, "teacher.name_or_path", cfg.teacher.trust_remote_code)
    problems = load_problems(cfg.task)[0][: d.n_problems]
    index, prompts, longest = teacher_prompts(problems, cfg, tok)
    tc, device = cfg.teacher, pick_device(cfg.device, Rank())
    engine = model_sampler(
        cfg.rollout, path, "teacher.name_or_path", tc.dtype, tc.trust_remote_code, tok, device,
        longest + d.max_new_tokens, cfg.seed,
    )  # fmt: skip
    rows, reasons = sample_and_judge(engine, index, prompts, problems, tok, make_checker(cfg.task), d, cfg.seed)
    stats = {"prompts": len(problems), "prompts_too_long": len(problems) - len(index), **summary(rows, reasons)}
    stats["settings"] = settings(cfg)
    if not stats["kept"]:
        counts = ", ".join(f"{r} {stats['dropped'][r]}" for r in DROP_REASONS)
        remedy = " or ".join(REMEDY[r] for r in DROP_REASONS if stats["dropped"][r])
        raise UserError(f"data: every sampled response was dropped ({counts}): {remedy}")
    write(out_dir, [r for r, why in zip(rows, reasons, strict=True) if why is None], stats)
    return stats


def write(out_dir: Path, rows: list[dict], stats: dict) -> None:
    """The kept rows as a ``datasets.Dataset`` in ``out_dir/data``, and ``out_dir/stats.json``."""
    import datasets  # heavy: only when writing

    features = datasets.Features(
        {
            **{k: datasets.Value("string") for k in ("question", "answer", "response")},
            **{k: datasets.Value("int64") for k in ("response_tokens", "problem", "sample")},
            "correct": datasets.Value("bool"),
        }
    )
    data = datasets.Dataset.from_list(rows, features=features).select_columns(list(COLUMNS))
    data.save_to_disk(str(out_dir / "data"))
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")


@hydra.main(config_path=CONF_DIR, config_name="data_teacher_rollouts", version_base="1.3")
def _teacher_rollouts(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    with one_line_errors():
        stats = run(cfg, out, list(HydraConfig.get().overrides.task))
    counts = {k: stats[k] for k in ("prompts", "sampled", "kept", "dropped", "accuracy")}
    print(json.dumps(counts), f"data: {out / 'data'}")


def select_aligned(cfg, problems: list[Problem], embedder) -> tuple[list[int], list[float], int]:
    """The candidates' order (best first), their scores and how many to keep; refuses a reference set that
    no candidate reaches ``select.min_similarity`` with (it does not overlap the task)."""
    sel = cfg.select
    reference = alignment.read_texts(cfg.reference.path, cfg.reference.question_key)
    texts = [alignment.problem_text(p, cfg.task.question_regex) for p in problems]
    scores = alignment.similarity_scores(
        alignment.embed(texts, embedder, cfg.embedding.batch_size),
        alignment.embed(reference, embedder, cfg.embedding.batch_size),
        sel.top_m,
    )
    best = float(scores.max())
    if best < sel.min_similarity:
        raise UserError(
            f"select.min_similarity: no training problem reaches {sel.min_similarity} (the best scores {best:.3f}): "
            f"the reference set {cfg.reference.path} does not overlap the task; give the teacher's prompts of this "
            "domain, or lower select.min_similarity"
        )
    return alignment.ranking(scores), scores.tolist(), alignment.keep_count(len(problems), sel.fraction, sel.n)


def run_aligned(cfg, out_dir: Path, overrides: list[str] = ()) -> dict:
    """Score the task's training problems against the reference prompts and write the best; returns (and
    writes) ``stats.json``'s content."""
    validate_aligned(cfg, overrides)
    problems = load_problems(cfg.task)[0]
    embedder = alignment.load_embedder(cfg.embedding.model, cfg.device)
    order, scores, n_keep = select_aligned(cfg, problems, embedder)
    kept = order[:n_keep]
    stats = {
        "candidates": len(problems),
        "kept": n_keep,
        "below_min_similarity_kept": sum(scores[i] < cfg.select.min_similarity for i in kept),
        "similarity": alignment.distribution(scores),
        "similarity_kept": alignment.distribution([scores[i] for i in kept]),
        "settings": {
            "task": cfg.task.path or cfg.task.dataset or cfg.task.name,
            "reference": cfg.reference.path,
            "embedding": cfg.embedding.model,
            **{k: v for k, v in cfg.select.items()},
        },
    }
    with (out_dir / "problems.jsonl").open("w") as f:
        for i in kept:
            row = alignment.nested_row(
                cfg.task.question_key, cfg.task.answer_key, problems[i].question, problems[i].answer
            )
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with (out_dir / "scores.jsonl").open("w") as f:
        for rank, i in enumerate(order):
            row = {"problem": i, "rank": rank, "score": scores[i], "kept": rank < n_keep}
            f.write(json.dumps(row | {"question": problems[i].question}, ensure_ascii=False) + "\n")
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


@hydra.main(config_path=CONF_DIR, config_name="data_aligned_prompts", version_base="1.3")
def _aligned_prompts(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    with one_line_errors():
        stats = run_aligned(cfg, out, list(HydraConfig.get().overrides.task))
    print(json.dumps({k: stats[k] for k in ("candidates", "kept")}), f"prompts: {out / 'problems.jsonl'}")


APPS = {"teacher-rollouts": _teacher_rollouts, "aligned-prompts": _aligned_prompts}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        fail(f"usage: opd-data {{{','.join(COMMANDS)}}} [overrides]")
    run_app(APPS[sys.argv.pop(1)])


if __name__ == "__main__":
    main()
