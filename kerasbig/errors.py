"""The two ways kerasbig fails: the user's input (exit 2) or the run itself (exit 1)."""


class UsageError(Exception):
    """Bad flags, config values, data or files: one line naming the problem and what to do. Exit code 2."""


class RunError(Exception):
    """A failure at run time that the user can act on (missing data, non-finite loss, lost worker). Exit 1."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
