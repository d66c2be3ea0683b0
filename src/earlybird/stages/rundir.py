"""The directory of a run and of each of its stages: file names, life cycle and summaries.

A stage directory holds the reference scripts' names (checkpoint.pth, model_best.pth,
EB-<percent>-<epoch>.pth, pruned.pth) and summary.json, which marks the stage finished. A run
directory (``earlybird run``) holds search/, pruned-<percent>/, retrain-<percent>/ and, with
--baseline, the same under baseline/.
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import RunDirError, WriteError
from ..files import atomic_write
from ..progress import Reporter
from ..train import distributed

SUMMARY, LAST, BEST, SWA, PRUNED, METRICS = ("summary.json", "checkpoint.pth", "model_best.pth", "swa.pth",
                                             "pruned.pth", "metrics.jsonl")


_HELD: dict[Path, int] = {}  # the directories this process writes to, locked until it exits


def tag(target: float | str) -> str:
    """A target in file names: a ratio in percent (EB-50-7.pth), a budget by its key (EB-macs50-7.pth)."""
    return target if isinstance(target, str) else str(round(target * 100))


def label(target: float | str) -> str:
    """A target in lines and tables: 0.5, or a budget's key (macs50)."""
    return target if isinstance(target, str) else f"{target:g}"


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # the stages of a run
    def search(self) -> "RunDir":
        return RunDir(self.path / "search")

    def pruned(self, ratio: float) -> "RunDir":
        return RunDir(self.path / f"pruned-{tag(ratio)}")

    def retrain(self, ratio: float) -> "RunDir":
        return RunDir(self.path / f"retrain-{tag(ratio)}")

    def baseline(self) -> "RunDir":
        return RunDir(self.path / "baseline")

    # the files of a stage
    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def swa(self) -> Path:
        return self.path / SWA

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def ticket(self, ratio: float, epoch: int) -> Path:
        return self.path / f"EB-{tag(ratio)}-{epoch}.pth"

    @property
    def finished(self) -> bool:
        return (self.path / SUMMARY).exists()

    def summary(self) -> dict:
        return json.loads((self.path / SUMMARY).read_text())

    def lock(self) -> None:
        """Take the directory for this process (rank 0 of a run): another earlybird process that
        would write here refuses in one line instead of interleaving its files with this one's."""
        path = self.path.absolute()
        if not distributed.is_main() or path in _HELD:
            return
        if path.exists() and not path.is_dir():
            raise RunDirError(f"--save {self.path} is a file, not a directory: choose another --save")
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"cannot write in --save {self.path} ({exc.strerror or exc}): choose another --save") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunDirError(f"another earlybird process{f' (pid {owner})' if owner else ''} is writing to "
                              f"{self.path}: wait for it to finish, or choose another --save") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[path] = fd

    def _artifacts(self) -> list[Path]:
        names = [SUMMARY, LAST, BEST, SWA, PRUNED, METRICS, "summary.txt"]
        return [self.path / n for n in names if (self.path / n).exists()] + sorted(self.path.glob("EB-*.pth"))

    def prepare(self, force: bool, resume: str | None = None, reporter: Reporter | None = None) -> Path | None:
        """Refuse to clobber a finished run; return the checkpoint to continue from, if any. An
        unfinished run is continued (as with --resume) unless --force starts it over."""
        save = self.path
        self.lock()
        if distributed.is_main() and save.is_dir():
            for stale in save.glob(".*.tmp"):  # a write cut short by a kill; the file it meant to replace is intact
                stale.unlink(missing_ok=True)
        if resume is not None:
            path = Path(resume) if resume else self.last
            if self.finished and not resume:
                raise RunDirError(f"{save} holds a finished run: nothing to resume (use --force to start it over)")
            if not path.is_file():
                raise RunDirError(f"no checkpoint to resume at {path}: start without --resume")
            return path
        if save.exists() and not save.is_dir():
            raise RunDirError(f"--save {save} is a file, not a directory: choose another --save")
        if (self.finished or (save / PRUNED).exists()) and not force:
            raise RunDirError(f"{save} holds a finished run: choose another --save or pass --force to overwrite it")
        if self.last.exists() and not force:
            if reporter:
                reporter.line(f"{save} holds an unfinished run: continuing it (pass --force to start over)")
            return self.last
        if distributed.is_main():
            try:
                if force:
                    for p in self._artifacts():
                        p.unlink()
                save.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RunDirError(f"cannot write in --save {save} ({exc.strerror or exc}): choose another --save") from None
        distributed.barrier()
        return None

    def write_summary(self, summary: dict, saved_at: str | None = None) -> None:
        """Mark the stage finished (rank 0 writes; every worker waits, so all can read what it wrote).
        ``saved_at``: a training stage's last point saved ("epoch 4"), which a rerun after a failed
        write resumes after."""
        if distributed.is_main():
            text = (json.dumps(summary, indent=2) + "\n").encode()
            try:
                atomic_write(self.path / SUMMARY, lambda f: f.write(text), len(text))
            except WriteError as exc:
                if saved_at is None:
                    raise
                raise exc.resuming(f": it resumes after {saved_at}, the last, and writes the summary") from None
        distributed.barrier()
