"""The two ways kerasbig fails, the user's input (exit 2) or the run itself (exit 1), and the exit code of a run
that a scheduler preempted."""

# SIGTERM stopped training after a checkpoint: "preempted, rerun the same command to resume". EX_TEMPFAIL of
# sysexits.h (a temporary failure, retrying may succeed): not 0, so a scheduler does not record a finished job,
# and apart from 1 and 2, so wrappers can requeue on it alone. Not above 128, where shells report signals.
PREEMPTED_EXIT_CODE = 75


class UsageError(Exception):
    """Bad flags, config values, data or files: one line naming the problem and what to do. Exit code 2."""


class RunError(Exception):
    """A failure at run time that the user can act on (missing data, non-finite loss, lost worker). Exit 1."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
