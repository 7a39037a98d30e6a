"""Version folders of a model, parsed the way TF Serving parses them: `<model base>/<N>/`.

TF Serving's file-system source reads every child of a model's base path whose name `absl::SimpleAtoi` takes
as an int64 (`ParseVersionNumber` in file_system_storage_path_source.cc): ASCII digits with an optional sign
and surrounding ASCII whitespace, so `00000123` is version 123 and ` 7 ` is 7. Every other name is ignored,
such as kerasbig's `.tmp-*` exports in progress.

>>> [parse("7"), parse("00000123"), parse("+5"), parse(".tmp-3"), parse("1.5"), parse("0x10"), parse("9" * 20)]
[7, 123, 5, None, None, None, None]
"""
from __future__ import annotations

import pathlib
import re

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
# absl's ascii_isspace: space, \t, \n, \v, \f, \r; [0-9] rather than \d, which would take any Unicode digit.
_VERSION = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)[ \t\n\v\f\r]*")


def parse(name: str) -> int | None:
    """The version a child's name stands for, or None if TF Serving would not read it as one."""
    match = _VERSION.fullmatch(name)
    if not match:
        return None
    version = int(match[1])
    return version if INT64_MIN <= version <= INT64_MAX else None


def folders(base: pathlib.Path) -> dict[int, pathlib.Path]:
    """{version: path} of the children of `base` that TF Serving reads as versions, oldest first; {} when `base`
    is not a folder. Files count as TF Serving lists them too (it then fails to load them). Where two names stand
    for one version (`1` and `001`), TF Serving keeps one in listing order; this keeps the first in name order."""
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return {}
    found: dict[int, pathlib.Path] = {}
    for path in entries:
        version = parse(path.name)
        if version is not None:
            found.setdefault(version, path)
    return dict(sorted(found.items()))
