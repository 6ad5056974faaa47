"""``opd-report DIR [DIR ...] [key=value ...]``: plots and tables for runs and sweeps (``opd_cli.analysis.report``)."""

from __future__ import annotations

import sys

from opd_cli.analysis.report import USAGE, parse_args, write_report
from opd_cli.errors import UserError, fail


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(
            f"{USAGE}\n  (each DIR a run directory or a multirun sweep directory; README.md, 'opd-report')",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        report = write_report(parse_args(sys.argv[1:]))
    except (FileNotFoundError, ValueError, UserError) as e:
        fail(str(e))
    print(report)


if __name__ == "__main__":
    main()
