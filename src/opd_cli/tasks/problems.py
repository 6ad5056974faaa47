"""Problems: the demo's arithmetic word problems, or rows of a hub data set or local file.

A task config names the data, the question and answer fields, and the held-out split.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from opd_cli.config.schema import TaskConfig
from opd_cli.errors import UserError
from opd_cli.tasks.rg import rg_split

TASK_DIR = Path(__file__).resolve().parents[3] / "conf" / "task"


@dataclass(frozen=True)
class Problem:
    question: str  # the problem text, before the prompt template is applied
    answer: str  # the gold answer, compared with the last \boxed{...} of a response
    solution: str | None = None  # a worked solution (SFT target), when the task has one


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


def arith_solution_tens_first(a: int, b: int) -> str:
    """Another worked addition of two two-digit numbers, ending in \\boxed{a+b}: the tens as
    round numbers first, then the ones, then their total (a thinking pattern unlike
    ``arith_solution``'s, from its first token on)."""
    tens, ones = (a // 10 + b // 10) * 10, a % 10 + b % 10
    return (
        f"Tens first: {a // 10 * 10} and {b // 10 * 10} make {tens}. "
        f"Then ones: {a % 10} and {b % 10} make {ones}. Total {tens} and {ones} is \\boxed{{{a + b}}}."
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


class BadData(ValueError):
    """A malformed data file or row: ``where`` is the line or row (empty: the whole file)."""

    def __init__(self, what: str, where: str = "") -> None:
        super().__init__(what)
        self.where = where


def _kind(value: Any) -> str:
    """What a JSON value is, for messages: "a list", "a number", "null", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    kinds = {str: "a string", int: "a number", float: "a number", dict: "an object", list: "a list"}
    return next((k for t, k in kinds.items() if isinstance(value, t)), type(value).__name__)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for each non-blank line of a jsonl file: one JSON value per line, UTF-8."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a byte-order mark some editors write
    for line_no, raw in enumerate(data.split(b"\n"), 1):
        where = f"line {line_no}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadData(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})", where) from None
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise BadData(
                f"not JSON ({e.msg} at column {e.colno}); a jsonl file has one object per line", where
            ) from None


def _parquet_rows(path: Path, keys: dict[str, str]) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of a parquet file whose columns hold the top level of each dotted
    path in ``keys`` (config key -> path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        reason = re.sub(
            r"^Could not open Parquet input source '.*?': ", "", str(e).splitlines()[0]
        )  # not the path again
        raise BadData(f"not a parquet file ({reason[:200]})") from None
    for config_key, dotted in keys.items():
        if (column := dotted.split(".")[0]) not in table.column_names:
            raise BadData(f"no column '{column}' ({config_key}={dotted}); its columns: {', '.join(table.column_names)}")
    for i, row in enumerate(table.to_pylist(), 1):
        yield f"row {i}", row


def _field(row: dict, dotted: str, config_key: str) -> Any:
    """The value at a dotted path (``prompt.0.content``, given by ``config_key``); ``BadData`` if
    the row has none."""
    value = row
    for part in dotted.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            fields = ", ".join(list(row)[:8]) + (", ..." if len(row) > 8 else "")
            raise BadData(f"no field '{dotted}' ({config_key}); the row's fields: {fields or 'none'}")
    return value


def row_problem(row: Any, question_key: str, answer_key: str, solution_key: str | None = None) -> Problem:
    """The problem in one data row: a non-empty string question and a non-empty answer (a string
    or a number), and with ``solution_key`` a non-empty string worked solution; ``BadData`` saying
    what is wrong with the row otherwise."""
    if not isinstance(row, dict):
        raise BadData(f"not a JSON object but {_kind(row)}")
    question = _field(row, question_key, "task.question_key")
    answer = _field(row, answer_key, "task.answer_key")
    if not isinstance(question, str) or not question.strip():
        got = "an empty string" if isinstance(question, str) else _kind(question)
        raise BadData(f"field '{question_key}' must be a non-empty string, got {got}")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
        got = "an empty string" if isinstance(answer, str) else _kind(answer)
        raise BadData(f"field '{answer_key}' must be a non-empty string or a number, got {got}")
    solution = None
    if solution_key is not None:
        solution = _field(row, solution_key, "task.solution_key")
        if not isinstance(solution, str) or not solution.strip():
            got = "an empty string" if isinstance(solution, str) else _kind(solution)
            raise BadData(f"field '{solution_key}' must be a non-empty string, got {got}")
    return Problem(question=question, answer=str(answer), solution=solution)


@functools.lru_cache(maxsize=4)
def _file_problems(
    path: str, mtime_ns: int, size: int, question_key: str, answer_key: str, solution_key: str | None
) -> tuple[Problem, ...]:
    """Every row of a file as a problem; cached by the file's modification time and size, so the
    start-up checks and the run read it once."""
    file = Path(path)
    rows = (
        _parquet_rows(file, row_keys(question_key, answer_key, solution_key))
        if file.suffix == ".parquet"
        else _jsonl_rows(file)
    )
    out = []
    for where, row in rows:
        try:
            out.append(row_problem(row, question_key, answer_key, solution_key))
        except BadData as e:
            raise BadData(str(e), where) from None
    if not out:
        raise BadData("no rows (an empty file)")
    return tuple(out)


def row_keys(question_key: str, answer_key: str, solution_key: str | None) -> dict[str, str]:
    """Config key -> dotted path of each field read from a row."""
    keys = {"task.question_key": question_key, "task.answer_key": answer_key}
    return keys if solution_key is None else {**keys, "task.solution_key": solution_key}


def read_problems(
    path: str | Path, question_key: str, answer_key: str, key: str = "task.path", solution_key: str | None = None
) -> list[Problem]:
    """Every problem of a local jsonl or parquet file, each row checked.

    Bad data is a ``UserError`` naming ``key`` (the config key that chose the file), the file, and
    the line (jsonl) or row (parquet, from 1) where it applies.
    """
    file = Path(path)
    if not file.exists():
        raise UserError(f"{key}: file not found: {path}")
    if file.is_dir():
        raise UserError(f"{key}: {path} is a directory; give a jsonl or parquet file")
    try:
        stat = file.stat()
        resolved = str(file.resolve())
        return list(_file_problems(resolved, stat.st_mtime_ns, stat.st_size, question_key, answer_key, solution_key))
    except BadData as e:
        raise UserError(f"{key}: {path}{' ' + e.where if e.where else ''}: {e}") from None
    except OSError as e:  # unreadable: permissions, a broken mount
        raise UserError(f"{key}: cannot read {path} ({e.strerror or e})") from None


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


def hub_problems(
    dataset: str | None,
    path: str | None,
    split: str,
    question_key: str,
    answer_key: str,
    key: str = "task.path",
    solution_key: str | None = None,
) -> list[Problem]:
    """Problems from a local file (``task.path``, see ``read_problems``) or a hub data set (``task.dataset``).

    ``question_key`` and ``answer_key`` are dotted paths into a row, e.g.
    ``prompt.0.content`` and ``reward_model.ground_truth`` for DAPO-Math-17k.
    """
    if path:
        return read_problems(path, question_key, answer_key, key, solution_key)
    out = []
    for i, row in enumerate(_rows_from_hub(str(dataset), split), 1):
        try:
            out.append(row_problem(row, question_key, answer_key, solution_key))
        except BadData as e:
            raise UserError(f"task.dataset: {dataset} row {i}: {e}") from None
    if not out:
        raise UserError(f"task.dataset: {dataset} split '{split}' has no rows")
    return out


def split_held_out(problems: list[Problem], seed: int, n_eval: int) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out): ``n_eval`` problems held out by a seeded shuffle."""
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    held = [problems[i] for i in order[:n_eval]]
    train = [problems[i] for i in order[n_eval:]]
    return train, held


ARITH_SIZE = 90 * 90  # the arith task's problems: every pair of two-digit numbers


def check_n_eval(n_rows: int, task_cfg, where: str, key: str = "task.n_eval") -> None:
    """A training task needs more rows than the ``task.n_eval`` it holds out."""
    if n_rows <= task_cfg.n_eval:
        raise UserError(
            f"{key}: {where} has {n_rows} rows, need more than task.n_eval={task_cfg.n_eval} "
            "(held out; the rest are trained on)"
        )


def load_problems(
    task_cfg, path_key: str = "task.path", n_eval_key: str = "task.n_eval"
) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems of the configured task; an evaluation-only task holds out every row.

    ``path_key`` and ``n_eval_key`` name the config keys that chose the file and the held-out
    count, for the error messages (a benchmark's file is chosen by another key than ``task.path``).
    """
    if task_cfg.name == "env":
        raise UserError("task.name: an environment task's episodes are played by opd-train only; use a data task")
    if task_cfg.name == "arith":
        check_n_eval(ARITH_SIZE, task_cfg, "the arith task", n_eval_key)
        return (
            arith_problems(task_cfg.seed, "train", task_cfg.n_eval),
            arith_problems(task_cfg.seed, "test", task_cfg.n_eval),
        )
    if task_cfg.name == "reasoning_gym":
        train, held = rg_split(task_cfg)
        return [Problem(q, a) for q, a in train], [Problem(q, a) for q, a in held]
    problems = hub_problems(
        task_cfg.dataset, task_cfg.path, task_cfg.split, task_cfg.question_key, task_cfg.answer_key, path_key,
        getattr(task_cfg, "solution_key", None),
    )  # fmt: skip
    if task_cfg.eval_only:
        return [], problems
    check_n_eval(len(problems), task_cfg, str(task_cfg.path or task_cfg.dataset), n_eval_key)
    return split_held_out(problems, task_cfg.seed, task_cfg.n_eval)


def check_task_data(task_cfg, path_key: str = "task.path", n_eval_key: str = "task.n_eval") -> None:
    """The start-up check of a task's data: a local file is read and every row checked, and a
    training task must have more rows than it holds out. A hub data set is left to the run
    (it may need a download); ``load_problems`` reads a file again from its cache."""
    if task_cfg.name == "arith":
        check_n_eval(ARITH_SIZE, task_cfg, "the arith task", n_eval_key)
    elif task_cfg.name == "reasoning_gym":  # made offline: the generator, its config and the size are checked
        rg_split(task_cfg)
    elif task_cfg.path:
        load_problems(task_cfg, path_key, n_eval_key)


def data_presets() -> list[str]:
    """The task presets of problems with answers: conf/task/<name>.yaml and conf/task/rg/<name>.yaml (named
    rg/<name>); an environment task's episodes are not a benchmark."""
    return [
        str(p.relative_to(TASK_DIR).with_suffix(""))
        for p in TASK_DIR.rglob("*.yaml")
        if not p.name.startswith("_") and OmegaConf.load(p).get("name") != "env"
    ]


def task_config(name: str, path: str | None, key: str, path_key: str):
    """A task preset from ``conf/task/`` (over its ``_base.yaml``), with a local file if given.

    ``key`` and ``path_key`` name the config keys that chose them, for the error messages.
    """

    presets = sorted(data_presets())
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


def mix_weights(task_cfg) -> tuple[list[str], list[float]]:
    """The sources' names and weights under ``task.mix``: the task's own prompts first (name ``task``,
    weight 1 minus the others'), then each entry's (its ``name``, else its file's stem)."""
    names = ["task"] + [m.name or Path(m.path).stem for m in task_cfg.mix]
    weights = [float(m.weight) for m in task_cfg.mix]
    return names, [1.0 - sum(weights), *weights]


def mix_problems(task_cfg) -> list[list[Problem]]:
    """Every row of each ``task.mix`` file, read with the task's question and answer keys."""
    return [
        read_problems(
            m.path,
            task_cfg.question_key,
            task_cfg.answer_key,
            f"task.mix.{i}.path",
            getattr(task_cfg, "solution_key", None),
        )
        for i, m in enumerate(task_cfg.mix)
    ]
