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
