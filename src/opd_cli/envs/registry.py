"""The environments a task can name (``task.env.name``), each an import path ``module:Class``.

An environment class is built as ``Class(**task.env.args)``, once per live episode; its module is
imported only when a run names it, so an environment's package (TextWorld, ALFWorld) is needed only
by the runs that use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from opd_cli.envs.base import Environment
from opd_cli.errors import UserError

ENVIRONMENTS: dict[str, str] = {
    # the built-in demo: reach a two-digit target by adding or subtracting single digits
    "demo": "opd_cli.envs.demo:ReachTarget",
    # TextWorld games (.z8) from a directory or glob: task.env.args.games (the envs extra)
    "textworld": "opd_cli.envs.textworld:TextWorldEnv",
    # ALFWorld's text games (game.tw-pddl) from its data (alfworld-download) or a glob (the envs extra)
    "alfworld": "opd_cli.envs.alfworld:ALFWorldEnv",
}


def env_class(name: str, key: str = "task.env.name") -> type:
    """The class registered as ``name``, or one line naming ``key`` and the known names."""
    if name not in ENVIRONMENTS:
        raise UserError(f"{key}: unknown environment {name!r}; known: {', '.join(sorted(ENVIRONMENTS))}")
    module, cls = ENVIRONMENTS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise UserError(f"{key}: environment {name!r} needs a package that is not installed ({e})") from None


def env_factory(name: str, args: dict, key: str = "task.env") -> Callable[[], Environment]:
    """A function that makes one fresh environment of ``task.env``; ``args`` are checked by making one."""
    cls = env_class(name, f"{key}.name")
    try:
        cls(**args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{key}.args: environment {name!r} does not take these arguments: {e}") from None
    return lambda: cls(**args)
