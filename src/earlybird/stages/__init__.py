"""The three stages of Early-Bird training (search, prune, retrain) and the whole pipeline.

Each stage takes typed configs and a Reporter, writes its outputs under its save directory and
returns a plain dict summary (also written as summary.json, which marks the stage finished).
What they share (runtime, save directories, loaders, the epoch loop) is in ``common``.
"""
from .checkpoints import evaluate_checkpoint, export_checkpoint, import_reference_checkpoint
from .pipeline import run_pipeline, summary_table
from .prune import prune
from .retrain import retrain
from .search import search

__all__ = ["evaluate_checkpoint", "export_checkpoint", "import_reference_checkpoint", "prune", "retrain", "run_pipeline",
           "search", "summary_table"]
