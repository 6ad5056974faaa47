"""Tasks: where prompts and gold answers come from, and how answers are checked.

A task yields ``Problem``s. ``arith`` generates two-digit addition word problems
with worked solutions (the embedded demo); hub tasks such as ``dapo_math`` load a
data set with ``datasets`` from the hub or from a local jsonl/parquet file.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opd_cli.errors import UserError

TASK_DIR = Path(__file__).resolve().parents[2] / "conf" / "task"


@dataclass(frozen=True)
class Problem:
    question: str  # the problem text, before the prompt template is applied
    answer: str  # the gold answer, compared with the last \boxed{...} of a response
    solution: str | None = None  # a worked solution (SFT target), when the task has one


# --------------------------------------------------------------------------- arith

_NAMES = ["Ann", "Ben", "Cat", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jo"]
_THINGS = ["apples", "pens", "cards", "coins", "shells", "books", "stamps", "beads"]
_TEMPLATES = [
    "{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
    "A box holds {a} {thing}. {name} puts in {b} more. How many {thing} are in the box?",
    "{name} found {a} {thing} on Monday and {b} on Tuesday. How many {thing} in all?",
]


def arith_solution(a: int, b: int, rng: random.Random | None = None) -> str:
    """Worked column addition of two two-digit numbers, ending in \\boxed{a+b}.

    With ``rng``, each column sum is a random number instead (the rest of the
    chain stays consistent with it): a solution with the right format and the
    right operands but wrong arithmetic, which is what the demo student learns.
    """
    ones = a % 10 + b % 10 if rng is None else rng.randint(0, 18)
    tens = a // 10 + b // 10 + ones // 10 if rng is None else rng.randint(1, 19)
    return (
        f"{a % 10}+{b % 10}={ones}, write {ones % 10} carry {ones // 10}. "
        f"{a // 10}+{b // 10}+{ones // 10}={tens}. So {a}+{b}=\\boxed{{{tens * 10 + ones % 10}}}."
    )


def arith_problems(seed: int, split: str, n_eval: int) -> list[Problem]:
    """All two-digit additions, split by ``seed`` into ``n_eval`` held-out and the rest.

    ``split`` is "train" or "test". Held-out pairs (a, b) never appear in training.
    """
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    chosen = pairs[:n_eval] if split == "test" else pairs[n_eval:]
    out = []
    for a, b in chosen:
        text = rng.choice(_TEMPLATES).format(name=rng.choice(_NAMES), thing=rng.choice(_THINGS), a=a, b=b)
        out.append(Problem(question=text, answer=str(a + b), solution=arith_solution(a, b)))
    return out


# --------------------------------------------------------------------------- answers


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (braces balanced), else None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def check_exact(response: str, answer: str) -> bool:
    """Exact match of the last boxed answer (whitespace stripped)."""
    got = last_boxed(response)
    return got is not None and got.strip() == answer.strip()


def check_math_verify(response: str, answer: str, timeout_s: int = 4) -> bool:
    """Symbolic equivalence of the last boxed answer with math-verify, within ``timeout_s`` seconds.

    math-verify normalizes LaTeX (``\\dfrac``, units, intervals, sets) and compares with
    sympy. Parsing the response and comparing each get half the time (math-verify's own
    alarm-based timeouts, so call it from the main thread); what times out counts as wrong.
    """
    from math_verify import parse, verify

    got = last_boxed(response)
    if got is None:
        return False
    half = max(1, timeout_s // 2)
    try:
        gold = parse(f"${answer}$", parsing_timeout=half)
        return bool(verify(gold, parse(f"${got}$", parsing_timeout=half), timeout_seconds=half))
    except Exception:  # unparsable or pathological input: a verdict of wrong, not a crash
        return False


CHECKERS = {"exact": check_exact, "math_verify": check_math_verify}


def make_checker(task_cfg) -> Callable[[str, str], bool]:
    """The task's answer check as ``check(response, gold) -> bool``."""
    if task_cfg.checker == "math_verify":
        return functools.partial(check_math_verify, timeout_s=task_cfg.answer_timeout_s)
    return CHECKERS[task_cfg.checker]


# --------------------------------------------------------------------------- hub / files


def _rows_from_file(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"task.path: file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    return rows


def _rows_from_hub(dataset: str, split: str) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(dataset, split=split))
    except Exception as e:  # offline, unknown name, or no such split
        raise UserError(
            f"task.dataset: cannot load data set '{dataset}' split '{split}' "
            f"(not in the local cache and it cannot be fetched offline?): "
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from None


def _field(row: dict, dotted: str, where: str):
    value = row
    for part in dotted.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise UserError(f"{where}: row has no field '{dotted}'")
    return value


def hub_problems(
    dataset: str | None, path: str | None, split: str, question_key: str, answer_key: str
) -> list[Problem]:
    """Problems from a local file (``task.path``) or a hub data set (``task.dataset``).

    ``question_key`` and ``answer_key`` are dotted paths into a row, e.g.
    ``prompt.0.content`` and ``reward_model.ground_truth`` for DAPO-Math-17k.
    """
    where = str(path) if path else f"data set {dataset}"
    rows = _rows_from_file(Path(path)) if path else _rows_from_hub(str(dataset), split)
    out = []
    for i, row in enumerate(rows):
        q = _field(row, question_key, f"{where} row {i}")
        a = _field(row, answer_key, f"{where} row {i}")
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"{where} row {i}: '{question_key}' is not a non-empty string")
        out.append(Problem(question=q, answer=str(a)))
    if not out:
        raise UserError(f"{where}: no rows")
    return out


# --------------------------------------------------------------------------- splits


def split_held_out(problems: list[Problem], seed: int, n_eval: int) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out): ``n_eval`` problems held out by a seeded shuffle."""
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    held = [problems[i] for i in order[:n_eval]]
    train = [problems[i] for i in order[n_eval:]]
    return train, held


def load_problems(task_cfg) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems of the configured task; an evaluation-only task holds out every row."""
    if task_cfg.name == "arith":
        return (
            arith_problems(task_cfg.seed, "train", task_cfg.n_eval),
            arith_problems(task_cfg.seed, "test", task_cfg.n_eval),
        )
    problems = hub_problems(task_cfg.dataset, task_cfg.path, task_cfg.split, task_cfg.question_key, task_cfg.answer_key)
    if task_cfg.eval_only:
        return [], problems
    if len(problems) <= task_cfg.n_eval:
        where = task_cfg.path or task_cfg.dataset
        raise UserError(f"task.n_eval: {where} has {len(problems)} rows, need more than {task_cfg.n_eval}")
    return split_held_out(problems, task_cfg.seed, task_cfg.n_eval)


def format_prompt(problem: Problem, task_cfg, tokenizer) -> str:
    """The prompt text: ``task.template`` filled in, in the chat template if asked.

    ``task.question_regex`` first takes the problem out of a row that wraps it in its own
    instructions (its group ``question``); a row it does not match keeps its whole text.
    """
    question = problem.question
    if task_cfg.question_regex and (match := re.search(task_cfg.question_regex, question)):
        question = match.group("question")
    try:
        text = task_cfg.template.format(question=question)
    except (IndexError, KeyError, ValueError) as e:
        raise UserError(
            f"task.template: cannot fill in {{question}} ({e}); write literal braces as {{{{ }}}}"
        ) from None
    if not task_cfg.chat_template:
        return text
    if tokenizer.chat_template is None:
        raise UserError("task.chat_template: the student's tokenizer has no chat template")
    kwargs = dict(task_cfg.chat_template_kwargs or {})
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, **kwargs
    )


def task_config(name: str, path: str | None, key: str, path_key: str):
    """A task preset from ``conf/task/`` (over its ``_base.yaml``), with a local file if given.

    ``key`` and ``path_key`` name the config keys that chose them, for the error messages.
    """
    from omegaconf import OmegaConf

    from opd_cli.config import TaskConfig

    presets = sorted(p.stem for p in TASK_DIR.glob("*.yaml") if not p.stem.startswith("_"))
    if name not in presets:
        raise UserError(f"{key}: unknown benchmark '{name}'; choose from: {', '.join(presets)}")
    own = OmegaConf.load(TASK_DIR / f"{name}.yaml")
    own.pop("defaults", None)
    cfg = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(TASK_DIR / "_base.yaml"), own)
    if path:
        if not Path(path).exists():
            raise UserError(f"{path_key}: file not found: {path}")
        cfg.path = path
    return cfg
