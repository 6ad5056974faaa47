"""Paper B's reward analyses on real models: ``opd-study auroc`` and ``opd-study reward-depth``.

Both start alike (``sample_study``): the student (``model``) samples ``n`` responses to each of the first
``n_problems`` prompts of the task's ``split`` in a rollout engine (``rollout.engine``, seeded), and the task's
checker judges each response.

- ``run_auroc``: each teacher of ``teachers`` (a transformers model, loaded one at a time) scores the
  responses; a response's reward is ``mean_t (log q(y_t) - log p(y_t))`` over its tokens (the EOS included,
  as OPD's loss counts it), with ``log p`` the student's raw temperature-1 log-probs the engine recorded while
  sampling (``RolloutBatch.old_logprobs``) and ``log q`` the teacher's, temperature 1. Per teacher: the AUROC of
  the reward against correctness, with a 95% bootstrap interval that resamples problems (with all their
  responses, which are not independent), and the ROC curve.
- ``run_reward_depth``: every response longer than a depth ``d`` is cut after its first ``d`` tokens; the
  student and then the teacher each sample ``continuations`` continuations of prompt + prefix, from the
  token ids (``generate_ids``: no re-tokenizing of text), and the checker judges prefix + continuation,
  decoded together. Per depth: the teacher's and the student's accuracy and the teacher's advantage, with its
  standard error over prefixes and a 95% bootstrap interval resampling problems.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from opd_cli.analysis.reward_checks import teacher_names
from opd_cli.analysis.reward_stats import (
    LEVEL,
    Prefix,
    auroc,
    bootstrap_interval,
    depth_prefixes,
    depth_rows,
    roc_curve,
    sequence_rewards,
)
from opd_cli.batch import RolloutBatch, chunk_bounds
from opd_cli.dist import Rank, pick_device
from opd_cli.errors import UserError
from opd_cli.models.checks import check_model
from opd_cli.models.loading import load_model, load_tokenizer, resolve_path
from opd_cli.progress import Progress
from opd_cli.rollout.registry import model_sampler
from opd_cli.tasks.checking import Checker, make_checker
from opd_cli.tasks.problems import Problem, load_problems
from opd_cli.tasks.prompts import format_prompt
from opd_cli.teacher.hf import HFTeacher
from opd_cli.training.data import prompt_length

# response positions per chunk of teacher scoring: bounds the [chunk, vocabulary] log-probs it holds at once
CHUNK_TOKENS = 1024
# below this many correct (or wrong) responses, auroc.md says that the AUROC rests on few of them
FEW = 10
# the continuations' seeds start this far past the responses' (seed + the first problem of a call)
CONTINUATION_SEED = 1_000_003


@dataclass
class Response:
    """One sampled response: its problem (index among the study's problems), which of the problem's samples,
    the prompt's and the response's token ids (up to and including EOS), the text the checker read, its verdict."""

    problem: int
    sample: int
    prompt_ids: list[int]
    ids: list[int]
    text: str
    correct: bool
    truncated: bool


@dataclass
class Sampled:
    """The study's problems and prompts, every response in order, and the engine's batches they came in."""

    problems: list[Problem]
    prompts: list[str]
    responses: list[Response]
    batches: list[RolloutBatch]


def study_problems(cfg, tokenizer) -> tuple[list[Problem], list[str]]:
    """The first ``n_problems`` problems of the task's ``split`` and their prompts."""
    train, held_out = load_problems(cfg.task)
    problems = (train if cfg.split == "train" else held_out)[: cfg.n_problems]
    if not problems:
        raise UserError(f"split: the task has no {cfg.split} problems")
    return problems, [format_prompt(p, cfg.task, tokenizer) for p in problems]


def batch_rows(batch: RolloutBatch) -> list[tuple[list[int], list[int]]]:
    """Each row's prompt ids (without padding) and response ids (up to and including EOS)."""
    P = batch.prompt_len
    return [
        (
            batch.input_ids[r, :P][batch.attention_mask[r, :P].bool()].tolist(),
            batch.input_ids[r][batch.response_mask[r]].tolist(),
        )
        for r in range(batch.input_ids.shape[0])
    ]


def sample_study(engine, problems: list[Problem], prompts: list[str], checker: Checker, cfg, desc: str) -> Sampled:
    """``n`` responses per prompt, ``batch_size`` sequences per engine call, each call seeded with ``seed`` plus
    its first problem's index (as opd-eval samples), each response judged."""
    responses, batches = [], []
    with Progress(len(problems) * cfg.n, desc, unit="samples") as bar:
        for s, e in chunk_bounds(len(problems), max(1, cfg.batch_size // cfg.n)):
            batch = engine.generate(prompts[s:e], cfg.n, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed + s)
            texts = engine.decode_responses(batch)
            for r, ((prompt_ids, ids), text) in enumerate(zip(batch_rows(batch), texts, strict=True)):
                i = s + r // cfg.n
                ok = bool(checker(text, problems[i].answer))
                responses.append(Response(i, r % cfg.n, prompt_ids, ids, text, ok, bool(batch.truncated[r])))
            batches.append(batch)
            bar.update((e - s) * cfg.n, acc=f"{np.mean([x.correct for x in responses]):.3f}")
    return Sampled(problems, prompts, responses, batches)


def free() -> None:
    """Give back the memory of models no longer referenced, before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def settings(cfg, sampled: Sampled, **more) -> dict:
    """How the responses were sampled, recorded with the results."""
    return {
        "model": cfg.model.name_or_path,
        **more,
        "engine": cfg.rollout.engine,
        "task": cfg.task.name if cfg.task.name != "hub" else cfg.task.path or cfg.task.dataset,
        "split": cfg.split,
        "n_problems": len(sampled.problems),
        "n": cfg.n,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
        "bootstrap": cfg.bootstrap,
        "seed": cfg.seed,
    }


def start(cfg, continue_tokens: int = 0):
    """The device, the student's tokenizer, the study's problems and prompts, and the student's engine (able
    to hold a prompt, a response and ``continue_tokens`` more)."""
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device, Rank())
    path = resolve_path(cfg.model.name_or_path, cfg)
    tok = load_tokenizer(path, "model.name_or_path", cfg.model.trust_remote_code)
    problems, prompts = study_problems(cfg, tok)
    max_len = max(prompt_length(tok, p) for p in prompts) + cfg.max_new_tokens + continue_tokens
    mc = cfg.model
    engine = model_sampler(
        cfg.rollout, path, "model.name_or_path", mc.dtype, mc.trust_remote_code, tok, device, max_len, cfg.seed
    )
    return device, tok, problems, prompts, engine, max_len


# ----------------------------------------------------------------------------------------------- auroc


def teacher_rewards(teacher: HFTeacher, batches: list[RolloutBatch], desc: str) -> np.ndarray:
    """The sequence-mean reward of every response of ``batches``, in order: the teacher's log-prob of each
    response token against the student's recorded one."""
    out = []
    with Progress(sum(b.input_ids.shape[0] for b in batches), desc, unit="responses") as bar:
        for batch in batches:
            q = teacher.score(batch, k=1).sampled_logprob.double().numpy()
            p = batch.old_logprobs[batch.response_mask].double().numpy()
            out.append(sequence_rewards(q, p, batch.response_mask.sum(1).tolist()))
            bar.update(batch.input_ids.shape[0])
    return np.concatenate(out)


def auroc_summary(rewards: np.ndarray, labels: np.ndarray, clusters: list[int], resamples: int, seed: int) -> dict:
    """A teacher's AUROC, its bootstrap interval, and its mean reward on correct and on wrong responses."""
    low, high, used = bootstrap_interval(lambda i: auroc(rewards[i], labels[i]), clusters, resamples, seed)
    return {
        "auroc": auroc(rewards, labels),
        "ci_low": low,
        "ci_high": high,
        "resamples_used": used,
        "reward_correct": float(rewards[labels].mean()),
        "reward_wrong": float(rewards[~labels].mean()),
    }


def run_auroc(cfg, out: Path) -> dict:
    """Sample, judge, score with every teacher; write samples.jsonl, auroc.json, auroc.md and roc.png."""
    device, tok, problems, prompts, engine, _ = start(cfg)
    sampled = sample_study(engine, problems, prompts, make_checker(cfg.task), cfg, "auroc: sample")
    engine.release()
    del engine
    free()
    key = "teachers" if cfg.teachers else "teacher.name_or_path"
    rewards = {}
    for name in teacher_names(cfg):
        model = load_model(resolve_path(name, cfg), key, cfg.teacher.dtype, device, cfg.teacher.trust_remote_code)
        check_model(model, key, sampling=False)
        teacher = HFTeacher(model, cfg.teacher.micro_batch_size, CHUNK_TOKENS)
        rewards[name] = teacher_rewards(teacher, sampled.batches, f"auroc: score {name}")
        del teacher, model
        free()
    write_samples(out / "samples.jsonl", sampled, rewards)
    labels = np.array([r.correct for r in sampled.responses])
    if labels.all() or not labels.any():
        raise UserError(
            f"n: all {len(labels)} responses were {'correct' if labels.all() else 'wrong'}, so the AUROC is undefined; "
            f"raise n or n_problems (or pick problems of mixed difficulty); {out / 'samples.jsonl'} holds them"
        )
    clusters = [r.problem for r in sampled.responses]
    results = {name: auroc_summary(r, labels, clusters, cfg.bootstrap, cfg.seed) for name, r in rewards.items()}
    data = {
        "settings": settings(cfg, sampled, teachers=list(rewards)),
        "n_responses": len(labels),
        "n_correct": int(labels.sum()),
        "n_truncated": sum(r.truncated for r in sampled.responses),
        "teachers": results,
    }
    (out / "auroc.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "auroc.md").write_text(auroc_markdown(data))
    plot_roc(out / "roc.png", {name: roc_curve(r, labels) for name, r in rewards.items()}, results)
    return data


def write_samples(path: Path, sampled: Sampled, rewards: dict[str, np.ndarray]) -> None:
    rows = [
        {
            "problem": r.problem,
            "sample": r.sample,
            "question": sampled.problems[r.problem].question,
            "answer": sampled.problems[r.problem].answer,
            "response": r.text,
            "tokens": len(r.ids),
            "truncated": r.truncated,
            "correct": r.correct,
            "reward": {name: float(v[i]) for name, v in rewards.items()},
        }
        for i, r in enumerate(sampled.responses)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def auroc_markdown(data: dict) -> str:
    s = data["settings"]
    acc = data["n_correct"] / data["n_responses"]
    lines = [
        "# AUROC of the sequence-mean teacher reward against correctness",
        "",
        f"Student {s['model']} ({s['engine']}), task {s['task']} ({s['split']}): {data['n_responses']} responses to "
        f"{s['n_problems']} problems, {data['n_correct']} correct ({acc:.3f}), {data['n_truncated']} at the length "
        f"limit; temperature {s['temperature']}, top-p {s['top_p']}, max_new_tokens {s['max_new_tokens']}, "
        f"seed {s['seed']}.",
        "",
        "Reward: mean over a response's tokens of log q(y_t) - log p(y_t), both at temperature 1. "
        f"Interval: {LEVEL:.0%}, {s['bootstrap']} bootstrap resamples of the problems. "
        "0.5: the reward does not tell correct from wrong responses (paper B: 0.73-0.75).",
        "",
        f"| teacher | AUROC | {LEVEL:.0%} interval | mean reward, correct | mean reward, wrong |",
        "|---|---|---|---|---|",
    ]
    for name, r in data["teachers"].items():
        lines.append(
            f"| {name} | {r['auroc']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['reward_correct']:.4f} "
            f"| {r['reward_wrong']:.4f} |"
        )
    fewest = min(data["n_correct"], data["n_responses"] - data["n_correct"])
    if fewest < FEW:
        which = "correct" if data["n_correct"] == fewest else "wrong"
        lines += [
            "",
            f"Only {fewest} of the responses are {which}: the AUROC and its interval rest on them; raise n.",
        ]
    return "\n".join([*lines, "", "![ROC](roc.png)"]) + "\n"


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {results[name]['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title("sequence-mean teacher reward vs correctness", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- reward-depth


def continue_prefixes(
    engine, tokenizer, inputs, prefixes, answers, checker: Checker, cfg, desc: str
) -> list[list[dict]]:
    """``continuations`` continuations of each prompt + prefix (``inputs``, token ids), each judged as the
    prefix (``prefixes``, token ids) and the continuation decoded together (decoded apart, a character split
    between them would be lost) against ``answers``: per input, ``[{"text": what was judged, "correct": ...}]``."""
    k = cfg.continuations
    out: list[list[dict]] = [[] for _ in inputs]
    with Progress(len(inputs) * k, desc, unit="continuations") as bar:
        for s, e in chunk_bounds(len(inputs), max(1, cfg.batch_size // k)):
            seed = cfg.seed + CONTINUATION_SEED + s
            batch = engine.generate_ids(inputs[s:e], k, cfg.temperature, cfg.top_p, cfg.max_new_tokens, seed)
            for r, (_, ids) in enumerate(batch_rows(batch)):
                i = s + r // k
                text = tokenizer.decode(prefixes[i] + ids, skip_special_tokens=True)
                out[i].append({"text": text, "correct": bool(checker(text, answers[i]))})
            bar.update((e - s) * k)
    return out


def run_reward_depth(cfg, out: Path) -> dict:
    """Sample, cut, continue with the student and then the teacher; write continuations.jsonl,
    reward_depth.json, reward_depth.md and reward_depth.png."""
    device, tok, problems, prompts, engine, max_len = start(cfg, cfg.max_new_tokens)
    checker = make_checker(cfg.task)
    sampled = sample_study(engine, problems, prompts, checker, cfg, "reward-depth: sample")
    kept = [r for r in sampled.responses if len(r.ids) >= cfg.min_response_tokens]
    depths = sorted(cfg.depths)
    prefixes = depth_prefixes([len(r.ids) for r in kept], depths)
    if not prefixes:
        longest = max((len(r.ids) for r in sampled.responses), default=0)
        raise UserError(
            f"depths: no response is longer than {depths[0]} tokens (the longest has {longest}"
            f"{f', min_response_tokens={cfg.min_response_tokens}' if cfg.min_response_tokens else ''}); "
            "lower the depths or raise max_new_tokens"
        )
    cut = [kept[p.rollout].ids[: p.depth] for p in prefixes]
    inputs = [kept[p.rollout].prompt_ids + c for p, c in zip(prefixes, cut, strict=True)]
    answers = [problems[kept[p.rollout].problem].answer for p in prefixes]
    student = continue_prefixes(engine, tok, inputs, cut, answers, checker, cfg, "reward-depth: student continues")
    engine.release()
    del engine
    free()
    tc = cfg.teacher
    path = resolve_path(tc.name_or_path, cfg)
    engine = model_sampler(
        cfg.rollout, path, "teacher.name_or_path", tc.dtype, tc.trust_remote_code, tok, device, max_len, cfg.seed
    )
    teacher = continue_prefixes(engine, tok, inputs, cut, answers, checker, cfg, "reward-depth: teacher continues")
    engine.release()
    clusters = [kept[p.rollout].problem for p in prefixes]
    teacher_ok, student_ok = ([[c["correct"] for c in cs] for cs in side] for side in (teacher, student))
    rows = depth_rows(prefixes, teacher_ok, student_ok, clusters, depths, cfg.bootstrap, cfg.seed)
    write_continuations(out / "continuations.jsonl", tok, kept, prefixes, cut, teacher, student)
    data = {
        "settings": settings(
            cfg,
            sampled,
            teacher=tc.name_or_path,
            continuations=cfg.continuations,
            min_response_tokens=cfg.min_response_tokens,
        ),  # fmt: skip
        "n_responses": len(sampled.responses),
        "n_kept": len(kept),
        "response_acc": float(np.mean([r.correct for r in sampled.responses])),
        "depths": rows,
    }
    (out / "reward_depth.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "reward_depth.md").write_text(reward_depth_markdown(data))
    plot_reward_depth(out / "reward_depth.png", rows)
    return data


def write_continuations(path: Path, tokenizer, kept, prefixes: list[Prefix], cut, teacher, student) -> None:
    rows = [
        {
            "problem": kept[p.rollout].problem,
            "sample": kept[p.rollout].sample,
            "depth": p.depth,
            "prefix": tokenizer.decode(c, skip_special_tokens=True),
            "response_correct": kept[p.rollout].correct,
            "teacher": t,
            "student": s,
        }
        for p, c, t, s in zip(prefixes, cut, teacher, student, strict=True)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _cell(value: float | None, fmt: str = ".3f") -> str:
    return "" if value is None else format(value, fmt)


def reward_depth_markdown(data: dict) -> str:
    s = data["settings"]
    lines = [
        "# Teacher's continuation advantage against prefix depth",
        "",
        f"Student {s['model']}, teacher {s['teacher']} ({s['engine']}), task {s['task']} ({s['split']}): "
        f"{data['n_responses']} responses to {s['n_problems']} problems (accuracy {data['response_acc']:.3f}), "
        f"{data['n_kept']} kept (at least {s['min_response_tokens']} tokens); {s['continuations']} continuations "
        f"per prefix and side; temperature {s['temperature']}, top-p {s['top_p']}, max_new_tokens "
        f"{s['max_new_tokens']}, seed {s['seed']}.",
        "",
        "Advantage: the teacher's accuracy minus the student's, continuing the same prefixes (paper B: +0.37 at 1K "
        f"tokens, +0.02 at 16K). Standard error over prefixes; interval: {LEVEL:.0%}, {s['bootstrap']} bootstrap "
        "resamples of the problems.",
        "",
        f"| depth | prefixes | teacher acc | student acc | advantage | standard error | {LEVEL:.0%} interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["depths"]:
        interval = "" if r["ci_low"] is None else f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        lines.append(
            f"| {r['depth']} | {r['n_prefixes']} | {_cell(r['teacher_acc'])} | {_cell(r['student_acc'])} "
            f"| {_cell(r['advantage'], '+.3f')} | {_cell(r['se'])} | {interval} |"
        )
    return "\n".join([*lines, "", "![reward vs depth](reward_depth.png)"]) + "\n"


def plot_reward_depth(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["n_prefixes"]]
    depths = [r["depth"] for r in rows]
    fig, (acc_ax, adv_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for side in ("teacher", "student"):
        acc_ax.plot(depths, [r[f"{side}_acc"] for r in rows], marker="o", label=side)
    acc_ax.set(xlabel="prefix length (tokens)", ylabel="accuracy of prefix + continuation", ylim=(-0.02, 1.02))
    acc_ax.set_title("continuation accuracy", fontsize=10)
    acc_ax.legend(fontsize=8)
    adv = np.array([r["advantage"] for r in rows])
    low, high = np.array([r["ci_low"] for r in rows]), np.array([r["ci_high"] for r in rows])
    adv_ax.errorbar(depths, adv, yerr=[adv - low, high - adv], marker="o", capsize=4)
    adv_ax.axhline(0, color="grey", linestyle=":", linewidth=1)
    adv_ax.set(xlabel="prefix length (tokens)", ylabel="teacher - student accuracy")
    adv_ax.set_title(f"teacher's advantage ({LEVEL:.0%} bootstrap interval)", fontsize=10)
    for ax in (acc_ax, adv_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
