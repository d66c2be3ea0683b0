"""User-facing failures.

Every problem a user can fix (bad flags, missing data, a corrupt or foreign checkpoint, a ratio
that would empty a layer) is raised as an :class:`EarlyBirdError`; the CLI prints its message
on one line and exits with code 2. Any other exception is a bug and keeps its traceback.
"""


class EarlyBirdError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ConfigError(EarlyBirdError, ValueError):
    """A flag or argument is out of range or names something unknown."""


class DataError(EarlyBirdError):
    """A dataset is missing, malformed or could not be downloaded."""


class CheckpointError(EarlyBirdError):
    """A checkpoint is missing, truncated, foreign or does not fit the model."""


class PruneError(EarlyBirdError):
    """A pruning request cannot be carried out (e.g. it would empty a layer)."""


class RunDirError(EarlyBirdError):
    """The save directory holds a run that would be overwritten."""


class TrainingError(EarlyBirdError):
    """Training diverged (NaN or infinite loss)."""


def format_bytes(n: int) -> str:
    """'1.1 MiB', '868.0 KiB', '12 bytes'."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} bytes"


class WriteError(EarlyBirdError):
    """A file could not be written (disk full, quota, I/O error); its previous version is intact.
    ``resume`` says where running the same command again continues, where a stage knows."""

    def __init__(self, path, reason: str, needed: int, free: int | None, resume: str = ""):
        self.path, self.reason, self.needed, self.free, self.resume = path, reason, needed, free, resume
        free_text = f", {format_bytes(free)} free there" if free is not None else ""
        super().__init__(f"could not write {path}: {reason} (it needs about {format_bytes(needed)}{free_text}); the "
                         f"previous version is intact: free space there or choose another --save, then run the same "
                         f"command again{resume}")

    def resuming(self, resume: str) -> "WriteError":
        return WriteError(self.path, self.reason, self.needed, self.free, resume)
