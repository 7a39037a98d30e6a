"""Small-file writes that a reader (TensorBoard, TF Serving, a resumed run) never sees half done."""
from __future__ import annotations

import pathlib


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Writes `text` to a hidden sibling, then renames it over `path` (atomic on one filesystem)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
