"""The two ways kerasbig fails: the user's input (exit 2) or the run itself (exit 1)."""


class UsageError(Exception):
    """Bad flags, config values, data or files: one line naming the problem and what to do. Exit code 2."""


class RunError(Exception):
    """A failure at run time that the user can act on (missing data, non-finite loss, lost worker). Exit 1."""
