"""Answer checkers (``task.checker``): whether a response's final answer equals the gold one.

A built-in by name, or a function of your own by import path (``task.checker=mypkg.checks:lenient``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
from collections.abc import Callable

from opd_cli.errors import UserError
from opd_cli.tasks.rg import rg_accepts


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


MIN_ANSWER_CHARS = 64  # a boxed answer up to this long is always compared
ANSWER_LENGTH_RATIO = 8  # a longer one may be at most this many times the gold answer's length


def _chars(text: str) -> int:
    return len("".join(text.split()))


def plausible_length(got: str, gold: str) -> bool:
    """Whether a boxed answer is short enough to be compared with the gold one: at most
    ``max(64, 8 x len(gold))`` characters, whitespace not counted.

    math-verify can be fooled by an answer far longer than the gold one: it parses
    ``\\boxed{1+1+...+1}`` with 1,000 or more terms as equal to 1. No plausible final answer is
    that long, so such an answer is judged wrong without being parsed.
    """
    return _chars(got) <= max(MIN_ANSWER_CHARS, ANSWER_LENGTH_RATIO * _chars(gold))


def check_math_verify(response: str, answer: str, timeout_s: int = 4) -> bool:
    """Symbolic equivalence of the last boxed answer with math-verify, within ``timeout_s`` seconds.

    math-verify normalizes LaTeX (``\\dfrac``, units, intervals, sets) and compares with
    sympy. Parsing the response and comparing each get half the time (math-verify's own
    alarm-based timeouts, so call it from the main thread); what times out counts as wrong.
    A boxed answer longer than ``max(64, 8 x len(gold))`` characters (whitespace not counted,
    see ``plausible_length``) is wrong without being parsed.
    """
    from math_verify import parse, verify

    if threading.current_thread() is not threading.main_thread():
        # off the main thread math-verify's alarms fail, and every answer would silently count as wrong
        raise RuntimeError("check_math_verify needs the main thread: its timeouts are SIGALRM alarms")
    got = last_boxed(response)
    if got is None or not plausible_length(got, answer):
        return False
    half = max(1, timeout_s // 2)
    try:
        gold = parse(f"${answer}$", parsing_timeout=half)
        return bool(verify(gold, parse(f"${got}$", parsing_timeout=half), timeout_seconds=half))
    except Exception:  # unparsable or pathological input: a verdict of wrong, not a crash
        return False


# check(response, gold) -> whether the response's final answer is the gold one
Checker = Callable[[str, str], bool]
# task.checker -> the check (keyword arguments from the task config: task.answer_timeout_s)
CHECKERS: dict[str, Callable[..., bool]] = {"exact": check_exact, "math_verify": check_math_verify}
# task.checker -> the task config's keys it takes, as keyword argument -> config key
CHECKER_OPTIONS: dict[str, dict[str, str]] = {"math_verify": {"timeout_s": "answer_timeout_s"}}
# task.checker of a task.name=reasoning_gym task: its generator's own score_answer (built per task, not a
# function of (response, gold) alone)
RG_CHECKER = "reasoning_gym"


def resolve_checker(name: str, key: str = "task.checker") -> Callable[..., bool]:
    """The check ``task.checker`` names: a built-in (``CHECKERS``) or ``package.module:function``, a function
    of your own taking ``(response, gold)`` and returning whether the response is right (its reward)."""
    if name in CHECKERS:
        return CHECKERS[name]
    module_name, colon, attr = name.partition(":")
    if not colon or not module_name or not attr:
        raise UserError(
            f"{key}: '{name}' is not one of: {', '.join([*CHECKERS, RG_CHECKER])}, nor a 'package.module:function' path"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{key}: cannot import '{module_name}' ({e}); is its directory on PYTHONPATH?") from None
    check = getattr(module, attr, None)
    if not callable(check):
        raise UserError(f"{key}: '{module_name}' has no function '{attr}'")
    try:
        inspect.signature(check).bind("response", "gold")
    except TypeError:
        raise UserError(f"{key}: '{name}' must take (response, gold) and return a bool") from None
    except ValueError:
        pass  # a builtin without a signature: called as is
    return check


def check_task_checker(task_cfg, key: str = "task.checker") -> None:
    """The start-up check of ``task.checker``: a built-in or an importable function, or ``reasoning_gym`` on a
    ``task.name=reasoning_gym`` task."""
    if task_cfg.checker != RG_CHECKER:
        resolve_checker(task_cfg.checker, key)
    elif task_cfg.name != "reasoning_gym":
        raise UserError(
            f"{key}: reasoning_gym scores with the generator of a task.name=reasoning_gym task (task=rg/<name>); "
            f"this task is '{task_cfg.name}': use {', '.join(CHECKERS)} or your own function"
        )


def reasoning_gym_checker(task_cfg) -> Checker:
    """``check(response, gold)``: the generator of a ``task.name=reasoning_gym`` task scores the last
    ``\\boxed{...}`` of the response (stripped) 1.0 (``rg.rg_accepts``); no box is wrong."""
    accepts = rg_accepts(task_cfg)

    def check(response: str, gold: str) -> bool:
        got = last_boxed(response)
        return accepts(None if got is None else got.strip(), gold)

    return check


def make_checker(task_cfg) -> Checker:
    """The task's answer check as ``check(response, gold) -> bool``."""
    if task_cfg.checker == RG_CHECKER:
        return reasoning_gym_checker(task_cfg)
    check = resolve_checker(task_cfg.checker)
    options = {arg: getattr(task_cfg, key) for arg, key in CHECKER_OPTIONS.get(task_cfg.checker, {}).items()}
    return functools.partial(check, **options) if options else check
