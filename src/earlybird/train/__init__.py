"""Training: the shared epoch loop and checkpoints."""
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .loop import EpochResult, EvalResult, evaluate, lr_at, train_epoch

__all__ = ["EpochResult", "EvalResult", "evaluate", "load_checkpoint", "lr_at", "model_from_checkpoint", "save_checkpoint", "train_epoch"]
