"""Progress of the long phases (evaluation, opd-eval, opd-study, the demo build), on rank 0 only.

On a terminal a phase shows a tqdm bar on stderr that disappears when it ends. Where stderr is
not a terminal (a log file, SLURM, a pipe) a bar's carriage-return updates would pile up in the
log, so a phase writes one plain line to stderr at most every ``LOG_EVERY_S`` seconds instead
(done/total, rate, elapsed, an estimate of the time left). Either way, its end is one log record
(``opd_cli.progress``, INFO: how much, how long, how fast), so the run's log keeps every phase's
duration. Other ranks show nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

from opd_cli.dist import this_rank

log = logging.getLogger(__name__)

# seconds between two progress lines where stderr is not a terminal
LOG_EVERY_S = 30.0


def duration(seconds: float) -> str:
    """``41s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(desc: str, done: int, total: int, unit: str, elapsed: float, postfix: dict, initial: int = 0) -> str:
    """``eval: 512/1024 samples (50%), 12.3 samples/s, 41s elapsed, ~41s left, acc=0.42``.

    ``initial``: units done before this process started (a resumed run); the rate leaves them out.
    """
    rate = (done - initial) / elapsed if elapsed > 0 else 0.0
    parts = [f"{desc}: {done}/{total} {unit} ({100 * done / max(1, total):.0f}%)", f"{rate:.3g} {unit}/s"]
    parts.append(f"{duration(elapsed)} elapsed")
    if 0 < done < total and rate > 0:
        parts.append(f"~{duration((total - done) / rate)} left")
    parts += [f"{k}={v}" for k, v in postfix.items()]
    return ", ".join(parts)


class Progress:
    """A phase of ``total`` units: ``update(n, **postfix)`` as they get done, ``close()`` (or ``with``) at the end.

    ``initial``: units already done when it starts (a resumed run's steps).

    ``mode``: ``"bar"`` (tqdm), ``"lines"`` (a line per ``every_s`` seconds), ``"off"``;
    by default ``"off"`` off rank 0, else ``"bar"`` where ``file`` is a terminal, ``"lines"`` otherwise.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        mode: str | None = None,
        file: TextIO | None = None,
        every_s: float | None = None,
        initial: int = 0,
    ) -> None:
        self.file = file if file is not None else sys.stderr
        if mode is None:
            mode = "off" if not this_rank().main else "bar" if _isatty(self.file) else "lines"
        self.total, self.desc, self.unit, self.mode = total, desc, unit, mode
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self.done, self.initial, self.postfix, self.closed = initial, initial, {}, False
        self.start = self.last_line = time.monotonic()
        self.bar = None
        if mode == "bar":
            self.bar = tqdm(
                total=total, desc=desc, unit=unit, file=self.file, leave=False, dynamic_ncols=True, initial=initial
            )

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self.last_line >= self.every_s and self.done < self.total:
                self.last_line = now
                print(self.line(now), file=self.file, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.start
        return progress_line(self.desc, self.done, self.total, self.unit, elapsed, self.postfix, self.initial)

    def close(self) -> None:
        """End the phase: the bar goes, one log record says how much was done, in how long."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        if self.mode != "off":
            log.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _isatty(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # a closed or file-like object
        return False
