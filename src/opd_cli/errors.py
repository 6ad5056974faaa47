"""Bad input and stop requests: the exceptions, and how a command ends on them.

Every command ends the same way on them (``one_line_errors``): bad input is one line
``error: ...`` on stderr and exit code 2, no traceback; a stop request (SIGTERM) after its
checkpoint is one line and exit code 143.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on request, after saving a checkpoint


class UserError(Exception):
    """Bad input: a config value, a missing file, a malformed data row.

    The CLI prints its message as one line (``error: ...``) and exits with code 2.
    The message must name the offending key or file and say what is allowed.
    """


class Stopped(Exception):
    """Raised after the checkpoint of a stop request (SIGTERM) is saved; carries the step."""

    def message(self) -> str:
        return f"error: stopped by SIGTERM after saving step {self}; resume with trainer.resume=true"


def fail(message: str, show: bool = True) -> NoReturn:
    """End the process on bad input: ``error: <message>`` (unless ``show`` is false), exit code 2."""
    if show:
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


@contextmanager
def one_line_errors(show: bool = True) -> Iterator[None]:
    """End the process on a ``UserError`` or ``Stopped`` raised inside the block, with one line
    (printed only where ``show``: e.g. one rank of many) and its exit code; so too on a full or
    read-only disk met while writing (logs, the summary)."""
    try:
        yield
    except UserError as e:
        fail(str(e), show)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        where = f"{e.filename}: " if e.filename else ""
        fail(f"{where}{e.strerror}; free space (or make it writable), then resume with trainer.resume=true", show)
    except Stopped as e:
        if show:
            print(e.message(), file=sys.stderr)
        raise SystemExit(EXIT_STOPPED) from None
