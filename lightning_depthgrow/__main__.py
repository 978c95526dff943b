"""Command line: ``python -m lightning_depthgrow report PATH [--out DIR]``.

``PATH`` is an ``architecture_history.json`` written by ``ArchitectureLogger`` or a directory containing
exactly one (e.g. ``lightning_logs/version_0``). The report goes to ``--out`` (default: an
``architecture_report`` folder next to the history file).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _report(args: argparse.Namespace) -> int:
    from .history import ArchitectureHistory, find_history_file
    from .report import write_report

    try:
        path = find_history_file(args.path)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "architecture_report")
    files = write_report(ArchitectureHistory.load(path), out)
    print(files.html)
    for figure in files.figures.values():
        print(figure)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m lightning_depthgrow`` (one sub-command, ``report``)."""
    parser = argparse.ArgumentParser(prog="python -m lightning_depthgrow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="write an HTML report and PNG figures of an architecture history",
        description="Write architecture_report.html (figures embedded) and one PNG per figure.",
    )
    report.add_argument("path", help="architecture_history.json, or a directory containing one")
    report.add_argument("--out", default=None, help="output directory (default: architecture_report/ next to it)")
    report.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lightning_depthgrow`` and the ``lightning-depthgrow`` script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
