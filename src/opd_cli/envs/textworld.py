"""TextWorld games as a multi-turn environment (``task.env.name=textworld``).

A set of compiled TextWorld games (Z-machine files, ``.z1`` .. ``.z8``, as ``tw-make`` writes them)
is the instance set: ``task.env.args.games`` names a directory (every game file in it) or a glob.
Instance ``i`` is the ``i % n``-th game in sorted path order, whatever the seed (a game plays the
same for the same commands). The first observation is the game's intro with TextWorld's ASCII-art
banner and the interpreter's prompt/status line removed; each step answers the game's feedback,
the change in score as reward, and done when the game is won or lost (or after ``max_steps``
commands, the environment's own limit). ``success`` is whether the game was won.

Glulx games (``.ulx``) are refused: TextWorld 1.7 no longer plays them (regenerate them as ``.z8``).
"""

from __future__ import annotations

import glob
import os
import re
import warnings

import textworld

from opd_cli.envs.base import StepResult
from opd_cli.errors import UserError

ZMACHINE = re.compile(r"\.z[1-8]$")
# the interpreter's prompt ('>') at the end of each answer, with the status line printed after it
PROMPT = re.compile(r"\n\s*>[^\n]*\s*\Z")
GAME_OVER_PROMPT = "Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?"
# what the game answers once it is over; the rollout does not step a finished episode
GAME_OVER = "The game is over."
MAX_COMMAND = 198  # the Z-machine interpreter's input buffer (jericho truncates longer commands, with a warning)
# Inform's out-of-world verbs that write files into the working directory (save, transcripts) or end or
# restart the game; the game does not get them. Its parser reads 9 letters of a word ("transcripts" is
# "transcript") and takes "then" between two commands.
META_VERBS = ("save", "restore", "restart", "quit", "q", "script", "transcript", "unscript", "noscript")


def game_files(games: str, key: str = "task.env.args.games") -> list[str]:
    """The game files that ``games`` names (a directory, a file or a glob), sorted; one line naming ``key`` if none."""
    if not isinstance(games, str) or not games:
        raise UserError(f"{key}: give a directory or a glob of TextWorld game files (.z8), not {games!r}")
    path = os.path.expanduser(games)
    matched = sorted(glob.glob(os.path.join(path, "*"))) if os.path.isdir(path) else sorted(glob.glob(path))
    files = [f for f in matched if ZMACHINE.search(f) and os.path.isfile(f)]
    if not files:
        glulx = any(f.endswith(".ulx") for f in matched)
        why = "only Glulx (.ulx) games, which TextWorld 1.7 no longer plays (make them as .z8)" if glulx else "no game"
        raise UserError(f"{key}: {games!r} holds {why}; give a directory or a glob of TextWorld .z1-.z8 game files")
    return files


def clean(text: str) -> str:
    """A game's answer without the interpreter's noise: the banner (lines of ASCII art: no letter or
    digit), the trailing prompt and status line, the replay question after the end; blank runs made one."""
    text = PROMPT.sub("", text.replace("\r", "")).replace(GAME_OVER_PROMPT, "")
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if not line or re.search(r"[A-Za-z0-9]", line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def command(action: str) -> str:
    """The student's action as one game command that the interpreter can take safely: letters, digits,
    spaces, hyphens and apostrophes (what TextWorld's commands are made of; others become spaces: a
    backslash is an interpreter escape, control and non-ASCII characters can crash it, and '.' would
    chain commands), single spaces, at most ``MAX_COMMAND`` characters (its input buffer)."""
    kept = "".join(c if c.isascii() and (c.isalnum() or c in "-'") else " " for c in action)
    return " ".join(kept.split())[:MAX_COMMAND]


def meta_verb(cmd: str) -> str | None:
    """The out-of-world verb (``META_VERBS``) that starts ``cmd`` or a command chained in it with "then"."""
    first, words = True, cmd.lower().split()
    for word in words:
        if first and any(word[:9] == verb[:9] for verb in META_VERBS):
            return word
        first = word == "then"
    return None


class TextWorldEnv:
    """One episode of a TextWorld game at a time (module docstring)."""

    def __init__(self, games: str, max_steps: int | None = None) -> None:
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise UserError(
                f"task.env.args.max_steps: must be a whole number of at least 1 (or null), not {max_steps!r}"
            )
        self.files = game_files(games)
        self.max_steps = max_steps
        self._env: textworld.Environment | None = None
        self._path: str | None = None
        self.steps = 0
        self.score = 0
        self.won = self.over = False

    def num_instances(self, seed: int) -> int:
        return len(self.files)

    def reset(self, seed: int, instance: int) -> str:
        path = self.files[instance % len(self.files)]
        if self._env is None or self._path != path:
            self.close()
            infos = textworld.EnvInfos(feedback=True, score=True, won=True, lost=True)
            with warnings.catch_warnings():
                # jericho warns that it cannot read the score of a TextWorld game: TextWorld reads it itself
                warnings.filterwarnings("ignore", message=".*is not fully supported")
                self._env, self._path = textworld.start(path, request_infos=infos), path
        state = self._env.reset()
        self.steps, self.score = 0, int(state["score"] or 0)
        self.won, self.over = bool(state["won"]), bool(state["won"] or state["lost"])
        return clean(state.feedback)

    def step(self, action: str) -> StepResult:
        if self._env is None:
            raise RuntimeError("TextWorldEnv.step before reset")
        if self.over:
            return StepResult(GAME_OVER, 0.0, True)
        cmd = command(action)
        self.steps += 1
        limit = self.max_steps is not None and self.steps >= self.max_steps
        if (verb := meta_verb(cmd)) is not None:
            return StepResult(f'"{verb}" is not available here: play the game.', 0.0, limit)
        state, _, done = self._env.step(cmd)
        score = int(state["score"] or 0)
        reward, self.score = float(score - self.score), score
        self.won = bool(state["won"])
        self.over = bool(self.won or state["lost"] or done)
        return StepResult(clean(state.feedback), reward, self.over or limit)

    def success(self) -> bool:
        return self.won

    def close(self) -> None:
        """Free the game's interpreter (also done when the object is collected)."""
        if self._env is not None:
            self._env.close()
        self._env = self._path = None
