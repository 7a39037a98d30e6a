"""Folders of class subfolders on disk, the layout of `keras.utils.image_dataset_from_directory`; shared by the
`images:` and `text:` kinds.

    PATH/<class>/<file>                  one folder per class: a seeded split by file, stratified by class
    PATH/train/<class>/<file>            the splits as given; a missing validation/ or test/ is carved from
    PATH/validation/<class>/<file>       train/ the same way
    PATH/test/<class>/<file>

Every visible file in a class folder is an example; hidden files (`.DS_Store`) are not. Class names are the
folder names, sorted. Only file names are read here, so listing 10,000 files takes milliseconds.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import sklearn.model_selection

from kerasbig.data.text import SPLITS
from kerasbig.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Files:
    """Every split's file paths and int32 labels, and the class names the labels index."""

    class_names: tuple[str, ...]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (paths, labels)

    @property
    def num_examples(self) -> dict[str, int]:
        return {split: len(paths) for split, (paths, _) in self.splits.items()}

    def without(self, bad: set[str]) -> Files:
        """The same splits without the files in `bad`."""
        kept = {}
        for split, (paths, labels) in self.splits.items():
            keep = np.array([path not in bad for path in paths], bool)
            kept[split] = (paths[keep], labels[keep])
        return Files(self.class_names, kept)


def _visible(folder: str) -> list[str]:
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def _class_files(root: str, flag: str) -> dict[str, list[str]]:
    """Class name -> sorted file paths of the class folders under `root`."""
    classes = [name for name in _visible(root) if os.path.isdir(os.path.join(root, name))]
    if not classes:
        raise UsageError(f"{flag}: {root} has no class subfolders; put each class's files in a folder named after "
                         f"the class ({root}/CLASS/FILE)")
    if len(classes) == 1:
        raise UsageError(f"{flag}: {root} has a single class folder ({classes[0]!r}); a classifier needs at least "
                         "two, one folder per class")
    files = {}
    for name in classes:
        folder = os.path.join(root, name)
        files[name] = [os.path.join(folder, f) for f in _visible(folder) if os.path.isfile(os.path.join(folder, f))]
        if not files[name]:
            raise UsageError(f"{flag}: class folder {folder} has no files; add some or remove the folder")
    return files


def list_files(root: str, *, flag: str, seed: int, test_fraction: float, validation_fraction: float) -> Files:
    """The files under `root` split three ways (see the module docstring). `flag` names the config key in errors."""
    if not os.path.isdir(root):
        raise UsageError(f"{flag}: {root} is not a folder; point it at a folder with one subfolder per class")
    given = {split: os.path.join(root, split) for split in SPLITS if os.path.isdir(os.path.join(root, split))}
    if given and "train" not in given:
        raise UsageError(f"{flag}: {root} has {sorted(given)} but no train/ folder; add train/ or use one folder "
                         "per class")
    by_split = {split: _class_files(folder, flag) for split, folder in given.items()} or {"train": _class_files(root, flag)}
    class_names = tuple(by_split["train"])
    for split, files in by_split.items():
        if set(files) - set(class_names):
            raise UsageError(f"{flag}: {given[split]} has classes {sorted(set(files) - set(class_names))} that "
                             f"{given['train']} does not; every split's classes must be among train's")
    splits = {split: _flatten(files, class_names) for split, files in by_split.items()}
    missing = [split for split in SPLITS if split not in splits]
    if missing:
        paths, labels = splits.pop("train")
        fractions = {"test": test_fraction if "test" in missing else 0.0,
                     "validation": validation_fraction if "validation" in missing else 0.0}
        for split, index in _carve(labels, class_names, fractions, seed, flag).items():
            splits[split] = (paths[index], labels[index])
    return Files(class_names, {split: _interleave(*splits[split], seed) for split in SPLITS})


def _flatten(files: dict[str, list[str]], class_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    paths = [path for name in class_names for path in files.get(name, [])]
    labels = [label for label, name in enumerate(class_names) for _ in files.get(name, [])]
    return np.array(paths, dtype=object), np.array(labels, np.int32)


def _carve(labels: np.ndarray, class_names: tuple[str, ...], fractions: dict[str, float], seed: int,
           flag: str) -> dict[str, np.ndarray]:
    """Indices of train and of each split with a positive fraction (at least one file per class), stratified by
    class and fixed by `seed`."""
    counts = np.bincount(labels, minlength=len(class_names))
    carved = [split for split, fraction in fractions.items() if fraction > 0]
    needed = 1 + len(carved)
    if counts.min() < needed:
        name = class_names[int(counts.argmin())]
        raise UsageError(f"{flag}: class {name!r} has {counts.min()} file(s); a split into train, "
                         f"{' and '.join(carved)} needs at least {needed} per class")
    index, out = np.arange(len(labels)), {}
    try:
        for i, split in enumerate(carved):
            index, out[split] = sklearn.model_selection.train_test_split(
                index, test_size=max(len(class_names), round(fractions[split] * len(labels))), stratify=labels[index],
                random_state=seed + i)
    except ValueError as error:  # fewer files than the fractions need
        raise UsageError(f"{flag}: cannot carve {' and '.join(carved)} from {len(labels)} files of "
                         f"{len(class_names)} classes ({error}); add files or change data.test_fraction / "
                         "data.validation_fraction") from None
    return {"train": index, **out}


def _interleave(paths: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded order that mixes the classes, for readers that do not shuffle (evaluation, the dashboard)."""
    order = np.random.default_rng(seed).permutation(len(paths))
    return paths[order], labels[order]
