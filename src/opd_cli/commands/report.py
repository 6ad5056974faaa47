"""``opd-report DIR``: plots and a table for one run or a multirun sweep directory (``opd_cli.analysis.report``)."""

from __future__ import annotations

import sys
from pathlib import Path

from opd_cli.analysis.report import write_report
from opd_cli.errors import fail


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: opd-report DIR   (a run directory or a multirun sweep directory)", file=sys.stderr)
        sys.exit(2)
    try:
        report = write_report(Path(sys.argv[1]))
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    print(report)


if __name__ == "__main__":
    main()
