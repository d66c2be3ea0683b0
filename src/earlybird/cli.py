"""The `earlybird` command line: search, prune, retrain, run (all three), eval, export, report, import-reference,
models.

The only place that parses flags, prints errors and exits. ``COMMANDS`` names each command's
typed arguments (a dataclass of configs, which generates its flags and validates itself) and the
function it runs. A user-facing failure (EarlyBirdError) becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import fields
from typing import NamedTuple

from . import __version__
from .config import (EvalArgs, ExportArgs, ImportArgs, ModelsArgs, PruneArgs, ReportArgs, RetrainArgs, RunArgs,
                     SearchArgs, add_command_args, command_from_args)
from .errors import ConfigError, EarlyBirdError
from .progress import Reporter

EPILOG = "Docs and examples: README.md. Flags keep the names of the reference Early-Bird scripts."


def _stage(name: str) -> Callable:
    """The stage function ``name``, called with the command's configs as keywords."""
    def run(args, reporter: Reporter) -> None:
        from . import stages  # torch-heavy: only once the flags parsed

        getattr(stages, name)(**{f.name: getattr(args, f.name) for f in fields(args)}, reporter=reporter)
    return run


def _import(a: ImportArgs, reporter: Reporter) -> None:
    from .stages import import_reference_checkpoint

    import_reference_checkpoint(a.cfg, a.model_cfg, a.rt, reporter, lambda text: print(text, file=sys.stderr))


def _report(a: ReportArgs, reporter: Reporter) -> None:
    from .report import write_report

    reporter.line(f"report -> {write_report(a.report.run, a.report.out)}")


def _models(a: ModelsArgs, reporter: Reporter) -> None:
    from .models import available_models

    reporter.line("\n".join(available_models()))


class Command(NamedTuple):
    args: type
    run: Callable
    help: str
    workers: bool = False  # runs as one of several torchrun workers


COMMANDS: dict[str, Command] = {
    "search": Command(SearchArgs, _stage("search"), "train the dense network with L1 sparsity on BN scales (and "
                                                    "on the gates of attention heads and MLP neurons) until the "
                                                    "Early-Bird tickets emerge", True),
    "prune": Command(PruneArgs, _stage("prune"), "physically prune an EB ticket: fewer channels, copied weights, "
                                                 "exact BN-shift folding", True),
    "retrain": Command(RetrainArgs, _stage("retrain"), "retrain a pruned network: fine-tune the ticket from its "
                                                       "epoch, rewind it to the pretrained weights (--rewind "
                                                       "pretrained), or re-initialize (--reinit)", True),
    "run": Command(RunArgs, _stage("run_pipeline"), "search, prune every ticket, retrain each, and write a summary "
                                                    "with compute accounting", True),
    "eval": Command(EvalArgs, _stage("evaluate_checkpoint"), "top-1 / top-5 accuracy, parameters and MACs of any "
                                                             "dense, pruned or retrained checkpoint", True),
    "export": Command(ExportArgs, _stage("export_checkpoint"), "write a checkpoint's network as ONNX, TorchScript or "
                                                              "torch.export (.pt2), to deploy without earlybird"),
    "import-reference": Command(ImportArgs, _import, "convert a checkpoint of the reference implementation (full "
                                                     "unpickling: only files you trust) to an earlybird checkpoint"),
    "report": Command(ReportArgs, _report, "figures (mask-distance heat-map, curves, gamma histograms, kept "
                                           "channels) and a Markdown page of a run"),
    "models": Command(ModelsArgs, _models, "list the registered architectures"),
}


class _Parser(argparse.ArgumentParser):
    """Flag errors in one line, like every other earlybird error (argparse adds a usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="earlybird", description="Early-Bird tickets: find a small network early, "
                                     "prune it physically, retrain it.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"earlybird {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        add_command_args(sub.add_parser(name, help=command.help, description=command.help, epilog=EPILOG),
                         command.args)
    return parser


def _gpu_ids(config) -> list[int] | None:
    """Several --gpu-ids outside torchrun: this process becomes the launcher."""
    rt = getattr(config, "rt", None)
    if rt is None or not rt.gpu_ids or "WORLD_SIZE" in os.environ:
        return None
    from .train.distributed import parse_gpu_ids

    ids = parse_gpu_ids(rt.gpu_ids)
    return ids if len(ids) > 1 else None


def _say(line: str) -> None:
    """``line`` on stderr in one write: the workers under torchrun share the stream, and print's
    separate write of the newline let two workers' lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's "stop now": SLURM, Kubernetes, torchrun) handled as Ctrl-C is."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once is enough: a second (SLURM signals every process, then
    raise _Terminated                              # torchrun its workers) would break the clean stop


def _workers() -> int:
    """How many workers torchrun started (1 outside it)."""
    size = os.environ.get("WORLD_SIZE", "1")
    return int(size) if size.isdigit() else 1


def _peers():
    """The watch over the other workers (the module), where a command joined a group of several;
    None otherwise (imported only then)."""
    peers = sys.modules.get("earlybird.train.peers")
    return peers if peers is not None and peers.active() else None


def _stopped_by_peer(command: str, exc: BaseException) -> str | None:
    """The line to end with when another worker's failure is why this one stopped: the line that
    worker posted, or (one killed without a word: out of memory, SIGKILL) what was lost."""
    peers = _peers()
    if peers is None:
        return None
    line = peers.posted(wait=0.0 if isinstance(exc, KeyboardInterrupt) else 2.0)
    if line or isinstance(exc, KeyboardInterrupt) or not peers.lost(exc):
        return line
    return (f"earlybird {command}: error: another worker stopped without a word (killed, or out of memory?): "
            f"{str(exc).splitlines()[0][:200]}; the last completed epoch is saved: run the same command again to "
            "continue")


def _ending(handler) -> None:
    """The command is ending with an error: torchrun's SIGTERM (sent once a worker exits) must not
    cut the line short or turn it into a traceback."""
    if handler is not None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # only the main thread may set handlers (a library user calling main() from another thread keeps theirs)
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    completed = False
    try:
        command = COMMANDS[args.command]
        config = command_from_args(command.args, args)
        ids = _gpu_ids(config)
        if ids:
            from .train.distributed import launch_on_gpus

            return launch_on_gpus(ids, list(sys.argv[1:] if argv is None else argv), config.rt.port)
        if not command.workers and _workers() > 1:
            raise ConfigError(f"{args.command} runs in one process: start it without torchrun")
        command.run(config, Reporter())
        completed = True
    except EarlyBirdError as exc:
        _ending(previous)
        line = f"earlybird {args.command}: error: {exc}"
        _say(line)
        if peers := _peers():
            peers.post(line)  # the other workers stop with it instead of waiting in a collective
        return 2
    except KeyboardInterrupt as exc:
        line = _stopped_by_peer(args.command, exc)  # torchrun stops the others once one failed
        _say(line or f"earlybird {args.command}: {'terminated' if isinstance(exc, _Terminated) else 'interrupted'}; "
             "the last completed epoch is saved: run the same command again (or add --resume) to continue")
        return 2 if line else 143 if isinstance(exc, _Terminated) else 130
    except Exception as exc:
        _ending(previous)
        line = _stopped_by_peer(args.command, exc)
        if line:
            _say(line)
            return 2
        peers = _peers()
        if peers is None:
            raise
        traceback.print_exc()  # now: torchrun stops this worker as soon as its peers have exited
        peers.post(f"earlybird {args.command}: error: another worker failed with {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''} (its traceback is in its output)")
        return 1
    finally:
        if "earlybird.train.distributed" in sys.modules:  # imported only when a command ran
            sys.modules["earlybird.train.distributed"].finish(completed)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
