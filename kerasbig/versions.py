"""Version folders of a model, parsed the way TF Serving parses them: `<model base>/<N>/`.

TF Serving reads a folder name as a version when it is a non-negative integer (leading zeros allowed, so
`00000123` is version 123) and ignores every other name, such as kerasbig's `.tmp-*` exports in progress.

>>> [parse("7"), parse("00000123"), parse(".tmp-3"), parse("-1"), parse("1.5")]
[7, 123, None, None, None]
"""
from __future__ import annotations

import pathlib

INT64_MAX = 2 ** 63 - 1


def parse(name: str) -> int | None:
    """The version a folder name stands for, or None if TF Serving would not read it as one."""
    if not (name.isascii() and name.isdigit()):
        return None
    version = int(name)
    return version if version <= INT64_MAX else None


def folders(base: pathlib.Path) -> dict[int, pathlib.Path]:
    """{version: folder} of the version folders under `base`, oldest first; {} when `base` is not a folder.
    Where two names stand for one version (`1` and `001`), the first in name order is kept."""
    try:
        entries = sorted(p for p in base.iterdir() if p.is_dir())
    except OSError:
        return {}
    found: dict[int, pathlib.Path] = {}
    for path in entries:
        version = parse(path.name)
        if version is not None:
            found.setdefault(version, path)
    return dict(sorted(found.items()))
