"""Progress output: a bar per epoch on a terminal, one line per epoch always, metrics as JSONL."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .errors import ConfigError
from .files import append_line
from .train.distributed import is_main


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_ratio(ratio: float | None) -> str:
    """'1.35x', or '-' for a ratio that was not measured."""
    return "-" if ratio is None else f"{ratio:.2f}x"


class Reporter:
    """Prints lines to stdout; draws tqdm bars on stderr only when it is a terminal."""

    def __init__(self, bars: bool | None = None, out=None):
        self.out = out or sys.stdout
        self.bars = sys.stderr.isatty() if bars is None else bars

    def line(self, text: str = "") -> None:
        if is_main():  # under torchrun only rank 0 speaks
            print(text, file=self.out, flush=True)

    def bar(self, total: int, desc: str):
        """(update(done), close) of a plain progress bar, e.g. for decoding images."""
        if not self.bars or not is_main():
            return (lambda done: None), (lambda: None)
        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

        def update(done: int) -> None:
            bar.n = done
            bar.refresh()

        return update, bar.close

    def epoch_bar(self, total: int, desc: str):
        """A callback for train_epoch(on_batch=...) and a close() to call after the epoch."""
        if not self.bars or not is_main():
            return None, lambda: None
        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

        def update(done: int, loss: float, acc: float, ips: float) -> None:
            bar.n = done
            bar.set_postfix_str(f"loss {loss:.3f} acc {acc:.1f}% {ips:.0f} img/s", refresh=True)

        return update, bar.close


class MetricsLog:
    """Appends one JSON object per line (it survives resumes); with ``tensorboard`` also writes every
    numeric field as a TensorBoard scalar (tag ``stage/field``, step = epoch) in ``tensorboard/``."""

    def __init__(self, path: Path, tensorboard: bool = False):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard and is_main():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(log_dir=str(path.parent / "tensorboard"))

    def write(self, tensorboard: bool = True, **record) -> None:
        if not is_main():
            return
        record = {"time": round(time.time(), 3), **record}
        append_line(self.path, json.dumps(record))
        if self.writer is not None and tensorboard:
            stage, step = record.get("stage", "train"), record.get("epoch", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "time"):
                    self.writer.add_scalar(f"{stage}/{key}", value, step)
            self.writer.flush()
