"""The ``fastdiff`` command line: :func:`build_parser` (:mod:`fastdiff.cli.parser`) and thin commands
(:mod:`fastdiff.cli.commands`) that call library functions and print what they wrote.

Bad input (a missing file, an unknown name, a value out of range) ends with a one-line message and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from fastdiff.cli.parser import build_parser
from fastdiff.errors import InputError

__all__ = ["main", "build_parser"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fastdiff`` with ``argv`` (default: the process's arguments); the exit code (2: bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["schedule"] and len(argv) > 1 and argv[1] not in ("show", "optimize", "-h", "--help"):
        argv.insert(1, "show")  # `fastdiff schedule CONFIG` as before
    args = build_parser().parse_args(argv)
    func: Callable = args.func
    try:
        func(args)
    except InputError as err:
        print(f"fastdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
