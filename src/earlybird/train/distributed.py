"""Many processes with torchrun (DistributedDataParallel): set-up, rank-0 I/O, agreement checks.

``torchrun --nproc-per-node N -m earlybird search ...`` starts N processes; each reads RANK,
WORLD_SIZE and LOCAL_RANK from the environment, joins the process group (NCCL on GPUs, gloo on
CPUs) and trains on its share of every global batch. Only rank 0 writes files and prints. Masks and
the Early-Bird decision are computed on every rank from the same BN scales, which are checked to be
identical after every epoch.

The rank is known only once the group is joined (``init_from_env``); reading it before, under
torchrun, is an error rather than a silent "rank 0" on every worker. A worker that fails stops the
others through the rendezvous store (``peers``).

Every collective earlybird issues goes through ``_all_reduce``, which puts its tensor on a device
the process group serves: NCCL has no CPU backend, and a CPU tensor there fails a run mid-way.
"""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, TrainingError
from ..prune.layers import SelectBatchNorm2d
from . import peers


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


_WORLD: World | None = None  # set by init_from_env


def world() -> World:
    """This process's place among the workers (a single process: rank 0 of 1). Read from torch
    where a framework (Lightning) joined the process group itself. Under torchrun (WORLD_SIZE > 1)
    before the group is joined it is unknown, and asking is a bug: every rank would take itself for
    rank 0 (lock the --save folder, write the files) and the run would stop or hang."""
    if _WORLD is not None:
        return _WORLD
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    size = os.environ.get("WORLD_SIZE", "1")
    if size.isdigit() and int(size) > 1:
        raise RuntimeError(f"this process's rank was read before it joined the process group (WORLD_SIZE={size}): join "
                           "it first (torch.distributed.init_process_group, or earlybird.train.distributed.init_from_env)")
    return World()


def is_main() -> bool:
    return world().main


def init_from_env(use_cuda: bool) -> World:
    """Join the process group torchrun describes in the environment; a no-op for one process. A
    worker that joins also watches its peers: one that fails stops the others with its line."""
    global _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _WORLD = World()
        return _WORLD
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except KeyError as exc:
        raise ConfigError(f"WORLD_SIZE is {size} but {exc} is not set: start many processes with torchrun") from None
    if not dist.is_initialized():
        if use_cuda and local < torch.cuda.device_count():  # past it: resolve_device says what to do
            # NCCL's communicators and barriers use the current GPU: GPU 0 on every rank unless set first
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        peers.watch(size)
    _WORLD = World(rank, size, local)
    return _WORLD


def barrier() -> None:
    if world().active:
        dist.barrier()


def _group_device_types() -> set[str]:
    """The device types the process group's collectives take: {'cuda'} under NCCL (which has no CPU
    backend), {'cpu', 'cuda'} under gloo. Read from the group, not assumed from the run's device."""
    config = dist.get_backend_config()  # "cuda:nccl", "cpu:gloo,cuda:gloo", ...
    return {part.split(":")[0] for part in config.split(",") if ":" in part} or {"cpu"}


def collective_device(t: torch.Tensor) -> torch.device:
    """Where a collective over ``t`` runs: ``t``'s own device where the group serves it, else this
    rank's GPU (an NCCL group given a CPU tensor) or the CPU."""
    types = _group_device_types()
    if t.device.type in types:
        return t.device
    return torch.device("cuda", torch.cuda.current_device()) if "cuda" in types else torch.device("cpu")


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """The one place earlybird issues a collective: ``t`` reduced over the workers (in place), moved
    to a device the group serves and back. A CPU tensor in an NCCL collective is a RuntimeError
    ("No backend type associated with device type cpu"), raised only once a run has started."""
    device = collective_device(t)
    if device == t.device:
        dist.all_reduce(t, op)
        return t
    moved = t.to(device)
    dist.all_reduce(moved, op)
    return t.copy_(moved)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the workers (in place, and returned); the tensor itself for one process."""
    return _all_reduce(t) if world().active else t


def check_agree(t: torch.Tensor, what: str) -> None:
    """Fail loudly when the workers hold different values (they must compute the same masks)."""
    if not world().active:
        return
    hi = _all_reduce(t.detach().clone(), dist.ReduceOp.MAX)
    lo = _all_reduce(t.detach().clone(), dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise TrainingError(f"the workers disagree on {what} (largest difference {(hi - lo).abs().max().item():.3g}): "
                            "their models diverged; check that every rank runs the same code and data")


class _SumOverWorkers(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every worker's output depends
    on every worker's input."""

    @staticmethod
    def forward(ctx, t):
        return _all_reduce(t.clone())

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone())


def finish(completed: bool = True) -> None:
    """Leave the process group once every worker is done with it (gloo aborts a process that exits
    while its threads still hold work). A command that stopped early (an error, Ctrl-C, SIGTERM)
    leaves at once: the workers may have stopped in different collectives, and a barrier would wait
    for ever."""
    peers.close()
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP wrappers left in reference cycles must go before their process group
        try:
            if completed:
                dist.barrier()
        finally:
            dist.destroy_process_group()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole global batch, on any backend.

    torch's SyncBatchNorm runs on GPUs only; this one all-reduces per-channel sums (with autograd,
    so gradients flow across workers as they must), which gloo does on CPUs.
    """

    def forward(self, x):
        if not self.training or not world().active:
            return super().forward(x)
        c = x.shape[1]
        count = torch.full((1,), x.numel() / c, device=x.device, dtype=x.dtype)
        stats = _SumOverWorkers.apply(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * total / (total - 1).clamp_min(1), alpha=m)
        shape = (1, c, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return out * self.weight.view(shape) + self.bias.view(shape) if self.affine else out


class SyncSelectBatchNorm2d(SelectBatchNorm2d, nn.SyncBatchNorm):
    """A pruned network's select BN (a channel gather, then BN) with torch's SyncBatchNorm statistics."""


class GlobalSelectBatchNorm2d(SelectBatchNorm2d, GlobalBatchNorm2d):
    """A pruned network's select BN (a channel gather, then BN) with GlobalBatchNorm2d statistics."""


# By exact type, the synchronized form on GPUs and elsewhere. Subclasses with a forward of their
# own (a select BN's gather, a fused kernel) must not become a plain SyncBatchNorm, as torch's
# convert_sync_batchnorm makes them: that drops the gather, and a pruned PreResNet or DenseNet then
# fails at its first forward.
SYNC_FORMS: dict[type, tuple[type, type]] = {
    nn.BatchNorm2d: (nn.SyncBatchNorm, GlobalBatchNorm2d),
    SelectBatchNorm2d: (SyncSelectBatchNorm2d, GlobalSelectBatchNorm2d),
}


def _synchronized(bn: nn.BatchNorm2d, cls: type) -> nn.BatchNorm2d:
    like = bn.weight if bn.affine else bn.running_mean
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
              device=like.device if like is not None else None, dtype=like.dtype if like is not None else None)
    new.load_state_dict(bn.state_dict())
    if isinstance(bn, SelectBatchNorm2d):
        new.in_channels = bn.in_channels
    return new.train(bn.training)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Global batch statistics (in place, and returned): torch's SyncBatchNorm on GPUs,
    GlobalBatchNorm2d elsewhere, each with a select form for pruned networks' select BNs."""
    gpu = torch.device(device).type == "cuda"
    for name, m in list(model.named_modules()):
        forms = SYNC_FORMS.get(type(m))
        if forms is None:
            continue
        new = _synchronized(m, forms[0] if gpu else forms[1])
        if not name:
            return new
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module to train with: DDP around ``model`` when there are several workers."""
    if not world().active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def parse_gpu_ids(text: str) -> list[int]:
    """``--gpu-ids 0,2`` -> [0, 2], checked against the GPUs this machine has."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"--gpu-ids {text}: give GPU numbers separated by commas, e.g. --gpu-ids 0,1") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ConfigError(f"--gpu-ids {text}: give distinct GPU numbers, e.g. --gpu-ids 0,1")
    if not torch.cuda.is_available():
        raise ConfigError("--gpu-ids: no CUDA GPU is available here; drop --gpu-ids to run on the CPU")
    count = torch.cuda.device_count()
    if max(ids) >= count:
        raise ConfigError(f"--gpu-ids {text}: this machine has {count} GPU(s), numbered 0..{count - 1}"
                          + mask_note())
    return ids


def mask_note() -> str:
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" (the ones CUDA_VISIBLE_DEVICES={mask} lets this process see)" if mask is not None else ""


def visible_devices(ids: list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for the workers of GPUs ``ids``, which are numbered as this process sees
    them: through the mask already set (SLURM and containers set one), so that ``--gpu-ids 0,1``
    under CUDA_VISIBLE_DEVICES=4,5,6,7 is 4,5, not another job's 0,1."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return ",".join(map(str, ids))
    entries = [e.strip() for e in mask.split(",") if e.strip()]  # indices, GPU-<uuid> or MIG-<uuid>
    return ",".join(entries[i] for i in ids)


def launch_on_gpus(ids: list[int], argv: list[str], port: int | None = None) -> int:
    """One DDP worker per GPU through PyTorch's own launcher (what torchrun runs), on this node."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(ids)  # worker k uses the k-th listed GPU
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N workers with all cores each oversubscribe
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=len(ids), run_id=f"earlybird-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint=f"localhost:{port or 0}", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "earlybird", *argv)
    except ChildFailedError:
        return 1  # the failing worker printed its own error
    return 0
