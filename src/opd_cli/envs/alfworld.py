"""ALFWorld's text games as a multi-turn environment (``task.env.name=alfworld``).

ALFWorld (``pip install alfworld``; its data from ``alfworld-download``) ships each task as a
TextWorld PDDL game, ``game.tw-pddl`` (the ALFRED PDDL domain, the text grammar with the task's
goal, and the scene's PDDL problem), beside the task's ``traj_data.json``. The games are found as
ALFWorld's own ``AlfredTWEnv`` finds them: under ``<data_dir>/json_2.1.1/<split>``, every folder with
a ``traj_data.json`` whose task type is one of ``task_types`` and a ``game.tw-pddl`` marked
solvable, skipping movable-receptacle and sliced tasks. ``data_dir`` defaults to ``$ALFWORLD_DATA``
(ALFWorld's own default: ``~/.cache/alfworld``); ``games`` (a directory or glob of ``.tw-pddl``
files) replaces the search. Instance ``i`` is the ``i % n``-th game in sorted path order.

A game is played by TextWorld's PDDL engine with ALFWorld's name demangler (``apple 1``, not
``Apple|+00.10|...``). The first observation is the room and ``Your task is to: ...``; an action is
one of ALFWorld's commands (``go to fridge 1``, ``take apple 1 from countertop 1``; lower-cased,
whitespace collapsed), and one that is not admissible gets ``Nothing happens.``. Reward 1 and done
when the goal is reached (``success``); done also after ``max_steps`` actions (50, as in the
ALFWorld runs of verl-agent). ``admissible_commands: true`` appends the admissible commands to
every observation.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from collections.abc import Sequence

import fast_downward  # noqa: F401 - TextWorld's PDDL engine needs it (textworld[pddl]); a missing one is named at once
import textworld
from alfworld.agents.environment.alfred_tw_env import TASK_TYPES, AlfredDemangler

from opd_cli.envs.base import StepResult
from opd_cli.errors import UserError

SPLITS = ("train", "valid_seen", "valid_unseen")  # json_2.1.1/<split>, as alfworld-download lays them out
WELCOME = "-= Welcome to TextWorld, ALFRED! =-"
GAME_OVER = "The game is over."


def default_data_dir() -> str:
    """Where alfworld-download puts the data: ``$ALFWORLD_DATA``, else ``~/.cache/alfworld``."""
    return os.environ.get("ALFWORLD_DATA") or os.path.expanduser("~/.cache/alfworld")


def solvable(game_file: str) -> bool:
    """Whether ALFWorld marked the game solvable (its generator checks each one with its expert)."""
    try:
        with open(game_file) as f:
            return bool(json.load(f).get("solvable", False))
    except (OSError, ValueError):
        return False


@functools.cache
def split_games(split_dir: str, task_types: tuple[int, ...]) -> tuple[str, ...]:
    """The playable games under ``split_dir`` (AlfredTWEnv.collect_game_files' rules), sorted; cached,
    since the environment is built once per episode and a split holds thousands of games."""
    names = {TASK_TYPES[t] for t in task_types}
    found = []
    for root, _, files in os.walk(split_dir):
        if "traj_data.json" not in files or "movable" in root or "Sliced" in root:
            continue
        game = os.path.join(root, "game.tw-pddl")
        try:
            with open(os.path.join(root, "traj_data.json")) as f:
                task_type = json.load(f).get("task_type")
        except (OSError, ValueError):
            continue
        if task_type in names and os.path.isfile(game) and solvable(game):
            found.append(game)
    return tuple(sorted(found))


def glob_games(games: str) -> list[str]:
    """The ``.tw-pddl`` files that ``games`` names: a directory (searched recursively), a file or a glob."""
    path = os.path.expanduser(games)
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "**", "*.tw-pddl"), recursive=True))
    return sorted(f for f in glob.glob(path, recursive=True) if f.endswith(".tw-pddl") and os.path.isfile(f))


def check_args(split: str, task_types: object, max_steps: object) -> tuple[int, ...]:
    """Refuse bad arguments in one line each; the task types as a tuple."""
    if split not in SPLITS:
        raise UserError(f"task.env.args.split: {split!r} is not an ALFWorld split; allowed: {', '.join(SPLITS)}")
    types = tuple(task_types) if isinstance(task_types, Sequence) and not isinstance(task_types, str) else ()
    if not types or any(isinstance(t, bool) or t not in TASK_TYPES for t in types):
        known = ", ".join(f"{k} ({v})" for k, v in TASK_TYPES.items())
        raise UserError(
            f"task.env.args.task_types: give a non-empty list of ALFWorld task types, not {task_types!r}; known: {known}"
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise UserError(f"task.env.args.max_steps: must be a whole number of at least 1, not {max_steps!r}")
    return tuple(sorted(set(types)))


def clean(text: str) -> str:
    """An observation without ALFWorld's welcome banner."""
    return text.replace(WELCOME, "").strip()


def command(action: str) -> str:
    """The student's action as an ALFWorld command: lower case, one line, single spaces."""
    return " ".join(action.lower().split())


class ALFWorldEnv:
    """One episode of an ALFWorld text game at a time (module docstring)."""

    def __init__(
        self,
        data_dir: str | None = None,
        split: str = "train",
        games: str | None = None,
        task_types: Sequence[int] = tuple(TASK_TYPES),
        max_steps: int = 50,
        admissible_commands: bool = False,
    ) -> None:
        types = check_args(split, task_types, max_steps)
        if games is not None:
            self.files = glob_games(str(games))
            if not self.files:
                raise UserError(f"task.env.args.games: {games!r} holds no ALFWorld game (game.tw-pddl)")
        else:
            root = os.path.expanduser(str(data_dir) if data_dir else default_data_dir())
            split_dir = os.path.join(root, "json_2.1.1", split)
            self.files = list(split_games(os.path.abspath(split_dir), types))
            if not self.files:
                raise UserError(
                    f"task.env.args.data_dir: {split_dir} holds no solvable ALFWorld game of task types {list(types)} "
                    "(<task>/<trial>/game.tw-pddl beside traj_data.json); fetch the data with alfworld-download, "
                    "or set data_dir (or ALFWORLD_DATA) to where it is, or give task.env.args.games"
                )
        self.max_steps = max_steps
        self.show_admissible = bool(admissible_commands)
        self._env: textworld.Environment | None = None
        self._path: str | None = None
        self.steps = 0
        self.won = False

    def num_instances(self, seed: int) -> int:
        return len(self.files)

    def _observation(self, state) -> str:
        text = clean(state.feedback)
        if self.show_admissible:
            commands = [c for c in state["admissible_commands"] if c != "help"]
            text += "\nAdmissible actions: " + ", ".join(commands) + "."
        return text

    def reset(self, seed: int, instance: int) -> str:
        path = self.files[instance % len(self.files)]
        if self._env is None or self._path != path:
            self.close()
            infos = textworld.EnvInfos(won=True, admissible_commands=True)
            self._env = textworld.start(path, request_infos=infos, wrappers=[AlfredDemangler(shuffle=False)])
            self._path = path
        state = self._env.reset()
        self.steps, self.won = 0, bool(state["won"])
        return self._observation(state)

    def step(self, action: str) -> StepResult:
        if self._env is None:
            raise RuntimeError("ALFWorldEnv.step before reset")
        if self.won:
            return StepResult(GAME_OVER, 0.0, True)
        state, _, _ = self._env.step(command(action))
        self.steps += 1
        self.won = bool(state["won"])
        done = self.won or self.steps >= self.max_steps
        return StepResult(self._observation(state), 1.0 if self.won else 0.0, done)

    def success(self) -> bool:
        return self.won

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env = self._path = None
