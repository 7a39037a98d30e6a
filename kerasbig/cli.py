"""What every kerasbig command shares: one line on stderr and exit 2 for bad input, exit 1 for run-time failures.

    if __name__ == "__main__":
        define_flags()         # the entry point's own absl flags, defined only when it runs as a program
        cli.run(main)          # main() reads absl FLAGS and raises UsageError / RunError

Library modules define no flags, so that every kerasbig module can be imported into one process.
"""
from __future__ import annotations

import sys
import traceback
from typing import Callable

from absl import app, flags

from kerasbig.errors import RunError, UsageError, first_line

FLAGS = flags.FLAGS


def fail(code: int, message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a bad flag as one line and exit 2, instead of a usage dump and exit 1."""
    try:
        rest = FLAGS(argv)
    except flags.Error as err:
        fail(2, first_line(err))
    if len(rest) > 1:
        fail(2, f"unexpected arguments {rest[1:]}; every option is a --flag")
    return rest


def run(main: Callable[[], None], flags_parser: Callable[[list[str]], list[str]] = parse_flags) -> None:
    """Runs `main()` under absl, turning UsageError into exit 2 and every other failure into exit 1."""
    flags.DEFINE_boolean("verbose", False, "Print tracebacks of failures.")
    def guarded(argv: list[str]) -> None:
        try:
            main()
        except UsageError as err:
            fail(2, str(err))
        except RunError as err:
            if FLAGS.verbose:
                traceback.print_exc()
            fail(1, str(err))
        except KeyboardInterrupt:
            fail(1, "interrupted")
        except Exception as err:  # unexpected: one line, the traceback with --verbose
            if FLAGS.verbose:
                traceback.print_exc()
            fail(1, f"{type(err).__name__}: {first_line(err)} (rerun with --verbose for the traceback)")
    app.run(guarded, flags_parser=flags_parser)
