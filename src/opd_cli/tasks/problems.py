"""Problems: the demo's arithmetic word problems, or rows of a hub data set or local file.

A task config names the data, the question and answer fields, and the held-out split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from opd_cli.config.schema import TaskConfig
from opd_cli.errors import UserError

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


def task_config(name: str, path: str | None, key: str, path_key: str):
    """A task preset from ``conf/task/`` (over its ``_base.yaml``), with a local file if given.

    ``key`` and ``path_key`` name the config keys that chose them, for the error messages.
    """

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
