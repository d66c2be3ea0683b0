"""Hugging Face image datasets: ``--dataset hf:PATH`` for one written with ``save_to_disk``, or
``hf:NAME`` for one in the local Hugging Face cache (it loads offline once downloaded). The image
and label columns are found by feature type (``Image``, ``ClassLabel``) unless --image-column and
--label-column name them; the test split is ``validation``, ``val`` or ``test``, else a seeded,
stratified --val-fraction of ``train``. Optional: ``pip install "earlybird[hf]"``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import ConfigError, DataError
from .decode import open_image
from .images import Images, ImageOptions, hold_out

TEST_SPLITS = ("validation", "val", "test")


class HFSplit:
    """One split: ``open(i)`` decodes row ``i``'s image itself (the column is read undecoded, so a
    JPEG can be decoded at a reduced size and a broken one is named)."""

    def __init__(self, rows, image_column: str, labels: list[int], name: str):
        self.rows, self.image_column, self.labels, self.name = rows, image_column, labels, name

    def __len__(self) -> int:
        return len(self.labels)

    def open(self, i: int, shorter: int | None = None):
        value = self.rows[i][self.image_column]
        where = f"{self.name} row {i}"
        if value is None:
            raise DataError(f"{where} has no image: remove the row")
        if value.get("bytes"):
            return open_image(io.BytesIO(value["bytes"]), shorter, where)
        return open_image(value["path"], shorter, f"{where} ({value['path']})")

    def subset(self, keep: list[int]) -> "HFSplit":
        return HFSplit(self.rows.select(keep), self.image_column, [self.labels[i] for i in keep], self.name)

    def key(self) -> list:
        return [getattr(self.rows, "_fingerprint", None) or [f["filename"] for f in self.rows.cache_files],
                len(self.labels)]


@contextlib.contextmanager
def _quiet_hub(offline: bool):
    """The Hugging Face libraries without their log lines (cache notes, retries), and with ``offline``
    without any request: a miss then fails at once instead of retrying for half a minute."""
    import datasets
    import huggingface_hub.constants as hub

    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub")]
    saved = [(datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE), [lg.level for lg in loggers]]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        if offline:
            datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved[0]
        for lg, level in zip(loggers, saved[1]):
            lg.setLevel(level)


def _reachable(url: str, timeout: float = 2.0) -> bool:
    """Whether a connection to ``url``'s host opens (through a proxy: the library's to find out)."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.getproxies().get(parts.scheme):
        return True
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _failed(spec: str, exc: Exception) -> DataError:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return DataError(f"cannot open the Hugging Face dataset {spec} ({type(exc).__name__}: {first}): pass a folder "
                     "written with save_to_disk, or the name of a dataset in the local cache")


def _open(spec: str):
    """(the datasets module, the dataset): a folder, else a name looked up in the local cache first,
    then on the Hub where it can be reached."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"--dataset hf:{spec} needs the datasets package: pip install \"earlybird[hf]\"") from None
    if Path(spec).exists():
        try:
            return datasets, datasets.load_from_disk(spec)
        except Exception as exc:  # noqa: BLE001 - any failure to open the dataset is one line
            raise _failed(spec, exc) from None
    with contextlib.suppress(Exception):  # not in the cache (or unreadable there): the Hub may have it
        with _quiet_hub(offline=True):
            return datasets, datasets.load_dataset(spec)
    where = f"hf:{spec} is neither a folder nor a dataset in the local Hugging Face cache " \
            f"({datasets.config.HF_DATASETS_CACHE})"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in datasets.config.ENV_VARS_TRUE_VALUES:
        raise DataError(f"{where}, and HF_HUB_OFFLINE is set: download it where the Hub can be reached, or pass "
                        "a folder written with save_to_disk")
    if not _reachable(datasets.config.HF_ENDPOINT):
        raise DataError(f"{where}, and {datasets.config.HF_ENDPOINT} cannot be reached: download it where the Hub "
                        "can be reached, or pass a folder written with save_to_disk")
    try:
        with _quiet_hub(offline=False):
            return datasets, datasets.load_dataset(spec)
    except Exception as exc:  # noqa: BLE001
        raise _failed(spec, exc) from None


def _column(features, wanted: str | None, kind, flag: str, spec: str) -> str:
    if wanted is not None:
        if wanted not in features:
            raise DataError(f"{spec} has no column '{wanted}' (columns: {_columns(features)}): fix {flag}")
        return wanted
    found = [name for name, feature in features.items() if isinstance(feature, kind)]
    if not found:
        raise DataError(f"{spec} has no {kind.__name__} column (columns: {_columns(features)}): name the "
                        f"{'image' if flag == '--image-column' else 'label'} column with {flag}")
    return found[0]


def _columns(features) -> str:
    return ", ".join(f"{name} ({type(feature).__name__})" for name, feature in features.items())


def _classes(feature, column, datasets) -> list[str]:
    """Class names: a ClassLabel's, 0..max of integer labels, else the sorted distinct values."""
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if all(isinstance(v, int) and v >= 0 for v in column):
        return [str(k) for k in range(max(column) + 1)]
    return sorted({str(v) for v in column})


def _labels(column, classes: list[str], where: str) -> list[int]:
    """Class numbers of a label column (integers as they are, other values by name)."""
    index, labels = {name: i for i, name in enumerate(classes)}, []
    for v in column:
        i = v if isinstance(v, int) else index.get(str(v))
        if i is None or not 0 <= i < len(classes):
            raise DataError(f"{where} has the label {v!r}, which the training split lacks: one set of classes for all")
        labels.append(i)
    return labels


def load_hf(spec: str, opts: ImageOptions, seed: int = 0) -> Images:
    """A Hugging Face dataset as two splits of images and labels; every problem is one line."""
    datasets, obj = _open(spec)
    splits = {"train": obj} if isinstance(obj, datasets.Dataset) else dict(obj)
    if "train" not in splits:
        raise DataError(f"{spec} has no 'train' split (splits: {', '.join(splits)})")
    train = splits["train"]
    image = _column(train.features, opts.image_column, datasets.Image, "--image-column", spec)
    label = _column(train.features, opts.label_column, datasets.ClassLabel, "--label-column", spec)
    classes = _classes(train.features[label], train[label], datasets)
    values = _labels(train[label], classes, f"{spec}[train]")
    if len(set(values)) < 2:
        raise DataError(f"{spec} has one class in its '{label}' column: a classifier needs two or more classes")

    def split(ds, name: str) -> HFSplit:
        rows = ds.select_columns([image]).cast_column(image, datasets.Image(decode=False))
        labels = values if ds is train else _labels(ds[label], classes, f"{spec}[{name}]")
        return HFSplit(rows, image, labels, f"{spec}[{name}]")

    test_name = next((name for name in TEST_SPLITS if name in splits), None)
    notes = []
    if test_name is not None:
        return Images(f"hf:{spec}", split(train, "train"), split(splits[test_name], test_name), classes,
                      columns=(image, label))
    keep, held = hold_out(values, opts.val_fraction, seed)
    whole = split(train, "train")
    notes.append(f"no validation or test split: {len(held):,} training rows ({opts.val_fraction:g} of each class, "
                 f"seed {seed}) are held out for testing")
    return Images(f"hf:{spec}", whole.subset(keep), whole.subset(held), classes, notes, opts.val_fraction,
                  (image, label))
