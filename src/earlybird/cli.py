"""The `earlybird` command line: search, prune, retrain, run (all three), eval, report, import-reference, models.

The only place that parses flags, prints errors and exits. A user-facing failure
(EarlyBirdError) becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .config import (DataConfig, DetectConfig, EvalConfig, ImportConfig, LowPrecisionConfig, ModelCheck, ModelConfig,
                     OptimConfig, PruneConfig, PruneOptions, ReportConfig, RetrainConfig, RuntimeConfig, add_config_args,
                     config_from_args)
from .errors import EarlyBirdError
from .models import available_models
from .progress import Reporter

LOWP = "low precision (SWALP: block floating point, stochastic rounding, weight averaging)"
EPILOG = "Docs and examples: README.md. Flags keep the names of the reference Early-Bird scripts."


class _Parser(argparse.ArgumentParser):
    """Flag errors in one line, like every other earlybird error (argparse adds a usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="earlybird", description="Early-Bird tickets: find a small network early, "
                                     "prune it physically, retrain it.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"earlybird {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text, *configs):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        for cls, title in configs:
            add_config_args(p, cls, title)
        return p

    command("search", "train the dense network with BN sparsity until the Early-Bird tickets emerge",
            (DataConfig, "data"), (ModelConfig, "model"), (OptimConfig, "optimization"),
            (DetectConfig, "Early-Bird detection"), (LowPrecisionConfig, LOWP), (RuntimeConfig, "run"))
    command("prune", "physically prune an EB ticket: fewer channels, copied weights, exact BN-shift folding",
            (PruneConfig, "prune"), (ModelCheck, "model check"), (PruneOptions, "pruned architecture and latency"),
            (DataConfig, "data (for test accuracy)"), (RuntimeConfig, "run"))
    command("retrain", "retrain a pruned network: fine-tune the ticket from its epoch, or re-initialize (--reinit)",
            (RetrainConfig, "retrain"), (ModelCheck, "model check"), (DataConfig, "data"), (OptimConfig, "optimization"),
            (LowPrecisionConfig, LOWP), (RuntimeConfig, "run"))
    p = command("run", "search, prune every ticket, retrain each, and write a summary with compute accounting",
                (DataConfig, "data"), (ModelConfig, "model"), (OptimConfig, "optimization"),
                (DetectConfig, "Early-Bird detection"), (PruneOptions, "pruned architecture and latency"),
                (LowPrecisionConfig, LOWP), (RuntimeConfig, "run"))
    p.add_argument("--reinit", action="store_true", help="retrain re-initialized tickets (EB Train re-init) instead "
                   "of fine-tuning them")
    p.add_argument("--baseline", action="store_true", help="also run train-prune-retrain (dense training over the "
                   "whole schedule, prune at the end, fine-tune) with the same schedule and seed, and compare")
    command("eval", "top-1 / top-5 accuracy, parameters and MACs of any dense, pruned or retrained checkpoint",
            (EvalConfig, "eval"), (ModelCheck, "model check"), (DataConfig, "data"), (RuntimeConfig, "run"))
    command("import-reference", "convert a checkpoint of the reference implementation (full unpickling: only files "
            "you trust) to an earlybird checkpoint", (ImportConfig, "import"), (ModelConfig, "model"),
            (RuntimeConfig, "run"))
    command("report", "figures (mask-distance heat-map, curves, gamma histograms, kept channels) and a Markdown page "
            "of a run", (ReportConfig, None))
    sub.add_parser("models", help="list the registered architectures")
    return parser


def _dispatch(args: argparse.Namespace, reporter: Reporter) -> None:
    from . import stages  # torch-heavy: only once the flags parsed

    if args.command == "models":
        reporter.line("\n".join(available_models()))
        return
    if args.command == "report":
        from .report import write_report

        cfg = config_from_args(ReportConfig, args)
        reporter.line(f"report -> {write_report(cfg.run, cfg.out)}")
        return
    rt = config_from_args(RuntimeConfig, args)
    if args.command == "import-reference":
        stages.import_reference_checkpoint(config_from_args(ImportConfig, args), config_from_args(ModelConfig, args),
                                           rt, reporter, lambda text: print(text, file=sys.stderr))
        return
    data = config_from_args(DataConfig, args)
    check = config_from_args(ModelCheck, args) if args.command in ("prune", "retrain", "eval") else None
    if args.command == "search":
        stages.search(data, config_from_args(ModelConfig, args), config_from_args(OptimConfig, args),
                      config_from_args(DetectConfig, args), rt, reporter, lowp=config_from_args(LowPrecisionConfig, args))
    elif args.command == "prune":
        stages.prune(config_from_args(PruneConfig, args), config_from_args(PruneOptions, args), None, data, rt, reporter,
                     check=check)
    elif args.command == "eval":
        stages.evaluate_checkpoint(config_from_args(EvalConfig, args), data, rt, reporter, check)
    elif args.command == "retrain":
        stages.retrain(config_from_args(RetrainConfig, args), data, config_from_args(OptimConfig, args), rt, reporter,
                       lowp=config_from_args(LowPrecisionConfig, args), check=check)
    elif args.command == "run":
        stages.run_pipeline(data, config_from_args(ModelConfig, args), config_from_args(OptimConfig, args),
                            config_from_args(DetectConfig, args), config_from_args(PruneOptions, args), rt, args.reinit,
                            reporter, config_from_args(LowPrecisionConfig, args), args.baseline)


def _gpu_ids(args) -> list[int] | None:
    """Several --gpu-ids outside torchrun: this process becomes the launcher."""
    if not getattr(args, "gpu_ids", None) or "WORLD_SIZE" in os.environ:
        return None
    from .train.distributed import parse_gpu_ids

    ids = parse_gpu_ids(args.gpu_ids)
    return ids if len(ids) > 1 else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ids = _gpu_ids(args)
        if ids:
            from .train.distributed import launch_on_gpus

            return launch_on_gpus(ids, list(sys.argv[1:] if argv is None else argv), args.port)
        _dispatch(args, Reporter())
    except EarlyBirdError as exc:
        print(f"earlybird {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"earlybird {args.command}: interrupted; the last completed epoch is saved: run the same command "
              "again (or add --resume) to continue", file=sys.stderr)
        return 130
    finally:
        if "earlybird.train.distributed" in sys.modules:  # imported only when a command ran
            sys.modules["earlybird.train.distributed"].finish()
    return 0

