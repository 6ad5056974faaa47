"""Procedural problems of the reasoning-gym package (``task.name=reasoning_gym``, keys ``task.rg``).

``create_dataset(task.rg.dataset, size=task.rg.size, seed=task.seed, **task.rg.config)`` makes the
problems offline, each an entry with a question, a gold answer and the metadata its generator scores
answers with (``score_answer(answer, entry)``, a score in [0, 1]).

The package is imported only for such a task (importing it loads every generator, about 2 s).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from opd_cli.errors import UserError

# generators shown when task.rg.dataset names none (a few of each kind; the package has about a hundred)
EXAMPLES = ("basic_arithmetic", "chain_sum", "simple_equations", "leg_counting", "gsm_symbolic", "family_relationships")
# config keys set by other task keys, never by task.rg.config
OWN_KEYS = {"size": "task.rg.size", "seed": "task.seed"}


def generators() -> dict[str, type]:
    """The package's generators: name -> its config dataclass."""
    from reasoning_gym.factory import DATASETS

    return {name: config_cls for name, (_, config_cls) in DATASETS.items()}


def generator_config(task_cfg) -> dict[str, Any]:
    """``task.rg.config`` as a plain dict (the generator's keyword arguments)."""
    config = task_cfg.rg.config
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config) if isinstance(config, Mapping) else config


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _check_generator(name: str, config: Any) -> type:
    """The config dataclass of generator ``name``, after checking that it exists and takes ``config``'s keys."""
    known = generators()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"task.rg.dataset: '{name}' is not a reasoning-gym generator; {hint}"
            f"e.g. {', '.join(EXAMPLES)} ({len(known)} in all: reasoning_gym.factory.DATASETS)"
        )
    if not isinstance(config, dict):
        raise UserError(f"task.rg.config: must be a mapping of {name}'s options, got {config!r}")
    for key, instead in OWN_KEYS.items():
        if key in config:
            raise UserError(f"task.rg.config: '{key}' is set by {instead}, not in task.rg.config")
    options = [f.name for f in dataclasses.fields(known[name]) if f.name not in OWN_KEYS]
    if unknown := [k for k in config if k not in options]:
        raise UserError(f"task.rg.config: {name} has no option '{unknown[0]}'; its options: {', '.join(options)}")
    return known[name]


@functools.lru_cache(maxsize=8)
def _generated(name: str, size: int, seed: int, config_json: str) -> tuple[Any, tuple[dict, ...]]:
    """(the generator's data set, its entries with distinct questions in the order made); cached, so the
    start-up check, the problems and the checker make them once."""
    import reasoning_gym

    config = json.loads(config_json)
    try:
        data = reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
    except Exception as e:  # the generator's own check of its config (mostly AssertionError)
        raise UserError(f"task.rg.config: {name} refuses its config ({_one_line(e)})") from None
    entries, seen = [], set()
    for i in range(size):
        try:
            entry = data[i]
        except Exception as e:
            raise UserError(f"task.rg.config: {name} failed making problem {i} ({_one_line(e)})") from None
        if entry.get("answer") is None:
            raise UserError(
                f"task.rg.dataset: {name} makes problems without one gold answer (problem {i}); "
                f"choose a generator with one, e.g. {', '.join(EXAMPLES[:3])}"
            )
        if entry["question"] not in seen:
            seen.add(entry["question"])
            entries.append(entry)
    return data, tuple(entries)


def rg_entries(task_cfg) -> tuple[Any, tuple[dict, ...]]:
    """(data set, entries with distinct questions) of a ``task.name=reasoning_gym`` task; ``UserError``
    naming the key for an unknown generator, a config it refuses, or a size below 1."""
    if task_cfg.rg.size < 1:
        raise UserError(f"task.rg.size: must be an integer >= 1 (problems to make), got {task_cfg.rg.size}")
    config = generator_config(task_cfg)
    _check_generator(task_cfg.rg.dataset, config)  # before json: an unknown option need not be serializable
    try:
        config_json = json.dumps(config, sort_keys=True)
    except TypeError as e:
        raise UserError(f"task.rg.config: {e}") from None
    return _generated(task_cfg.rg.dataset, task_cfg.rg.size, task_cfg.seed, config_json)


def rg_split(task_cfg) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) as (question, gold answer) pairs: the first ``task.n_eval`` distinct problems are
    held out, the rest trained on. A problem depends on the seed and its index only, so the held-out set
    stays the same when ``task.rg.size`` grows; a question made twice is kept once, so none is in both."""
    _, entries = rg_entries(task_cfg)
    if len(entries) <= task_cfg.n_eval:
        made = f"{len(entries)} distinct problems" + (
            f" of {task_cfg.rg.size}" if len(entries) < task_cfg.rg.size else ""
        )
        raise UserError(
            f"task.rg.size: {task_cfg.rg.dataset} made {made}, need more than task.n_eval={task_cfg.n_eval} "
            "(held out; the rest are trained on)"
        )
    pairs = [(e["question"], str(e["answer"])) for e in entries]
    return pairs[task_cfg.n_eval :], pairs[: task_cfg.n_eval]


def rg_accepts(task_cfg) -> Callable[[str | None, str], bool]:
    """``accepts(answer, gold)``: whether the generator scores ``answer`` (the response's extracted answer,
    None if it has none) 1.0 on a problem whose gold answer is ``gold``.

    The check sees the gold answer, not the problem, so it scores against the problems with that gold
    answer and accepts if one of them gives 1.0 (the same verdict for generators that compare with the gold
    answer, the common case). A gold answer the generator did not make (a ``task.mix`` row's) is compared
    exactly. Partial credit (a score below 1.0) counts as wrong, and so does a scorer that fails.
    """
    data, entries = rg_entries(task_cfg)
    by_gold: dict[str, list[dict]] = {}
    for entry in entries:
        by_gold.setdefault(str(entry["answer"]), []).append(entry)

    def score(answer: str, entry: dict) -> float:
        try:
            return float(data.score_answer(answer, entry))
        except Exception:  # an answer the scorer cannot handle: wrong, not a crash
            return 0.0

    def accepts(answer: str | None, gold: str) -> bool:
        if answer is None:
            return False
        if gold not in by_gold:
            return answer.strip() == gold.strip()
        return any(score(answer, entry) >= 1.0 for entry in by_gold[gold])

    return accepts
