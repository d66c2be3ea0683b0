"""Class folders of one's own images: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or
``validation/`` or ``test/``), or ``train/`` alone, of which a seeded, stratified ``val_fraction``
is held out for testing. Any image format Pillow reads; other files are skipped and counted."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .decode import EXTENSIONS, FolderSplit
from .images import Images, hold_out

HELD_OUT = ("val", "validation", "test")


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _walk(folder: str) -> list[str]:
    """Every file under ``folder``, its subfolders included (not those reached by a link), in no
    order. os.scandir knows each entry's type from the listing: no stat per file (10,000s of them)."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                found += _walk(entry.path)
            elif entry.is_file():
                found.append(entry.path)
    return found


def _files(folder: Path) -> tuple[list[str], list[str]]:
    """(image files, other files) of one class folder, sorted as paths sort (by their parts)."""
    files = sorted(_walk(str(folder)), key=lambda f: f.split(os.sep))
    images = [f for f in files if os.path.splitext(f)[1].lower() in EXTENSIONS]
    return images, [f for f in files if os.path.splitext(f)[1].lower() not in EXTENSIONS]


def _split(split_dir: Path, classes: list[str], skipped: list[str], required: bool) -> FolderSplit:
    paths, labels = [], []
    for label, name in enumerate(classes):
        found, other = _files(split_dir / name) if (split_dir / name).is_dir() else ([], [])
        skipped += other
        if required and not found:
            raise DataError(f"class folder {split_dir / name} holds no images ({len(other)} other files): add images "
                            f"of that class or remove the folder")
        paths += found
        labels += [label] * len(found)
    return FolderSplit(paths, labels)


def scan_folder(root: str | Path, val_fraction: float = 0.1, seed: int = 0) -> Images:
    """The class folders under ``root`` as two splits; every problem is a one-line DataError."""
    root = Path(root)
    train_dir = root / "train"
    layout = (f"put the images in {train_dir}/<class>/ (and {root}/val/<class>/, or let --val-fraction hold "
              "some out)")
    if not train_dir.is_dir():
        raise DataError(f"{root} has no train/ folder: {layout}")
    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"{train_dir} has no class folders: {layout}")
    if len(classes) < 2:
        raise DataError(f"{train_dir} has one class folder ({classes[0]}): a classifier needs two or more classes")
    skipped: list[str] = []
    train = _split(train_dir, classes, skipped, required=True)
    held = next((root / d for d in HELD_OUT if (root / d).is_dir()), None)
    notes = []
    if held is not None:
        unknown = sorted(set(_class_dirs(held)) - set(classes))
        if unknown:
            raise DataError(f"{held} has classes that {train_dir} lacks ({', '.join(unknown[:3])}): add them to "
                            f"{train_dir.name}/ or remove them")
        test = _split(held, classes, skipped, required=False)
        if not test.paths:
            raise DataError(f"{held} holds no images: add some, or remove it and let --val-fraction hold some out")
    else:
        keep, held_out = hold_out(train.labels, val_fraction, seed)
        train, test = train.subset(keep), train.subset(held_out)
        notes.append(f"no val/ folder: {len(test.paths):,} of the training images ({val_fraction:g} of each class, "
                     f"seed {seed}) are held out for testing")
    if skipped:
        notes.insert(0, f"skipped {len(skipped)} non-image file{'s' if len(skipped) > 1 else ''} "
                        f"(e.g. {Path(skipped[0]).relative_to(root)})")
    return Images("folder", train, test, classes, notes, 0.0 if held is not None else val_fraction)
