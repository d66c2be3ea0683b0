"""A fused batch norm (+ ReLU) (+ 2x2 max-pool) for channels-last training on CPUs, compiled on first use.

ATen's channels-last batch norm walks the activation row by row (one row = one pixel's C
channels), and its backward pays for every row whose width is not a multiple of the vector width:
at the widths pruning leaves (24, 40, 72, ...) it was 2-10x slower per element than at 64 on a
2-core AVX-512 CPU, and batch norm became half of a pruned network's training step. The kernel in
``batch_norm.cpp`` walks the same memory in full-width blocks of whole rows and folds the ReLU that
follows into the same passes, and a 2x2 max-pool after that (VGG's blocks end so) as well: then
the full-size activation and its gradient are never stored (benchmarks/README.md has the figures).

:func:`fuse_batch_norm` switches a model's batch norms over in place (:func:`unfuse` switches them
back); model code that applies its own ReLU (and residual add) through
:func:`earlybird.models.layers.bn_relu` has them fused too. Parameters, buffers,
names and checkpoints stay as they were; outside its case (eval mode under autograd, contiguous or
CUDA tensors, other dtypes) a :class:`FusedBatchNorm2d` computes exactly what ``nn.BatchNorm2d``
(+ add, + ReLU) does.
"""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..prune.layers import SelectBatchNorm2d, select_channels

_SOURCE = Path(__file__).with_name("batch_norm.cpp")
_extension = None
_failure: str | None = None


def _build_name() -> str:
    """Differs between CPUs with different instruction sets (the build uses -march=native), torch
    versions and versions of the source, so that no build serves another."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    key = f"{platform.machine()} {flags} {torch.__version__}".encode() + _SOURCE.read_bytes()
    return f"earlybird_batch_norm_{hashlib.sha1(key).hexdigest()[:12]}"


def _build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "torch_extensions"
    return Path(root) / _build_name()


def needs_build() -> bool:
    """Whether :func:`load` will compile (about 25 s) rather than load a build of this machine's."""
    return _extension is None and _failure is None and not (_build_dir() / f"{_build_name()}.so").exists()


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ninja package's own one is there only in an activated
    environment (not, say, under ``venv/bin/python -m earlybird``)."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


def load() -> object | None:
    """The compiled kernel (built once per machine and cached under ``$TORCH_EXTENSIONS_DIR``, by
    default ``~/.cache/torch_extensions``), or None where it cannot be built: :func:`failure` says why."""
    global _extension, _failure
    if _extension is None and _failure is None:
        try:
            from torch.utils import cpp_extension

            _put_ninja_on_path()
            build = _build_dir()
            build.mkdir(parents=True, exist_ok=True)
            _extension = cpp_extension.load(_build_name(), [str(_SOURCE)], build_directory=str(build),
                                            extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                            extra_ldflags=["-fopenmp"])
        except Exception as e:  # no compiler, no ninja, no headers: torch's own kernel serves
            _failure = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return _extension


def failure() -> str | None:
    """Why :func:`load` gave None (None before it was tried or when it worked)."""
    return _failure


# the kernel's codes for what follows the batch norm
_ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2}
_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
# batch norm class -> its fused form, for fuse_batch_norm
FUSED_FORMS: dict[type, type] = {}


class _BatchNorm(torch.autograd.Function):
    """Batch norm (+ residual) (+ activation) on the kernel: (output, [mean; biased var; invstd])."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps: float, activation: int, pool: bool):
        output, stats, *codes = _extension.forward(x, residual, weight, bias, eps, activation, pool)
        ctx.activation = activation
        # after a residual the ReLU's mask is read from the output; without one it is recomputed from
        # x; after a pool, codes say which element of each window won (or that none passes a gradient)
        ctx.save_for_backward(x, None if residual is None else output, weight, bias, stats, *codes)
        ctx.mark_non_differentiable(stats)
        return output, stats

    @staticmethod
    def backward(ctx, grad_output, _):
        x, output, weight, bias, stats, *codes = ctx.saved_tensors
        grad_output = grad_output.to(x.dtype).contiguous(memory_format=torch.channels_last)
        grad_input, grad_weight, grad_bias, grad_residual = _extension.backward(
            grad_output, x, output, weight, bias, stats, ctx.activation, ctx.needs_input_grad[0],
            codes[0] if codes else None)
        return grad_input, grad_residual, grad_weight, grad_bias, None, None, None


def _kernel_takes(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.dim() == 4 and t.dtype in (torch.float32, torch.bfloat16)
            and t.is_contiguous(memory_format=torch.channels_last))


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.channels = x.shape[1]
        return _extension.gather(x, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        return _extension.scatter(grad, index, ctx.channels), None


def gather_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """:func:`earlybird.prune.layers.select_channels` in one pass of the kernel where it is loaded
    and takes ``x`` (a channels-last CPU tensor)."""
    if (_extension is not None and _kernel_takes(x) and index.device.type == "cpu" and index.dtype == torch.long
            and not torch.compiler.is_compiling()):
        return _Gather.apply(x, index)
    return select_channels(x, index)


_OWN = object()  # FusedBatchNorm2d.forward's default: the module's own activation


class FusedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d``, followed by ``activation`` (None, "relu" or "relu6") and, where ``pool``,
    a 2x2 max-pool of stride 2, that trains and evaluates (without autograd) channels-last CPU
    tensors (float32, or bfloat16 under autocast) with the fused kernel."""

    activation: str | None = None
    pool: bool = False

    def extra_repr(self) -> str:
        return (super().extra_repr() + (f", activation={self.activation}" if self.activation else "")
                + (", pool=max 2x2" if self.pool else ""))

    def _fused(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether the kernel serves this call: training, or evaluation with running statistics
        and no autograd (eval mode under autograd, or without running statistics, is torch's)."""
        mode = x.numel() > x.shape[1] if self.training else (
            self.running_mean is not None and not torch.is_grad_enabled())
        return (mode and self.affine and _extension is not None and self.weight.dtype == torch.float32
                and _kernel_takes(x) and (not self.pool or min(x.shape[2:]) >= 2) and not torch.compiler.is_compiling()
                and (residual is None or (_kernel_takes(residual) and residual.shape == x.shape
                                          and residual.dtype == x.dtype)))

    def forward(self, x, residual: torch.Tensor | None = None, activation=_OWN):
        """Batch norm, plus ``residual`` if given, then ``activation`` (default: the module's own),
        then the module's pool if it has one; a residual goes with a ReLU and no pool only."""
        activation = self.activation if activation is _OWN else activation
        if activation not in _ACTIVATIONS:
            raise ValueError(f"FusedBatchNorm2d's activation is None, 'relu' or 'relu6', not {activation!r}")
        if residual is not None and (activation != "relu" or self.pool):
            raise ValueError("FusedBatchNorm2d adds a residual only before a ReLU, and without a pool")
        if not self._fused(x, residual):
            y = super().forward(x)
            y = y if residual is None else y + residual
            if activation is not None:
                y = F.relu(y, inplace=True) if activation == "relu" else F.relu6(y, inplace=True)
            return F.max_pool2d(y, 2) if self.pool else y
        code = _ACTIVATIONS[activation]
        if not self.training:
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            return _extension.affine(x, residual, scale, self.bias - self.running_mean * scale, code, self.pool)
        output, stats = _BatchNorm.apply(x, residual, self.weight, self.bias, self.eps, code, self.pool)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = x.numel() // x.shape[1]
                self.running_mean.lerp_(stats[0], factor)
                self.running_var.lerp_(stats[1] * (n / (n - 1)), factor)  # unbiased, as torch keeps it
        return output


    def forward_relu(self, x, residual: torch.Tensor | None = None):
        """``relu(self(x) + residual)`` in one pass: what ``models.layers.bn_relu`` calls."""
        return self.forward(x, residual, "relu")


class FusedSelectBatchNorm2d(SelectBatchNorm2d, FusedBatchNorm2d):
    """A select BN on the fused kernel: the gathered channels go through :class:`FusedBatchNorm2d`,
    with its activation and residual."""

    def forward(self, x, residual=None, activation=_OWN):
        return FusedBatchNorm2d.forward(self, gather_channels(x, self.index), residual, activation)


FUSED_FORMS[nn.BatchNorm2d] = FusedBatchNorm2d
FUSED_FORMS[SelectBatchNorm2d] = FusedSelectBatchNorm2d


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _max_pool_2x2(m: nn.Module | None) -> bool:
    """Whether ``m`` is the pool the kernel folds: a plain 2x2 max-pool of stride 2, unpadded, floor mode."""
    return (type(m) is nn.MaxPool2d and _pair(m.kernel_size) == (2, 2) and _pair(m.stride) == (2, 2)
            and _pair(m.padding) == (0, 0) and _pair(m.dilation) == (1, 1) and not m.ceil_mode
            and not m.return_indices)


def fuse_batch_norm(model: nn.Module, pools: bool = True, undo: list | None = None) -> int:
    """Switch every plain ``nn.BatchNorm2d`` of ``model`` to :class:`FusedBatchNorm2d` (and each
    class in ``FUSED_FORMS`` to its fused form: a pruned network's select BNs), in place,
    and fold each ``nn.ReLU`` or ``nn.ReLU6`` that directly follows one in an ``nn.Sequential`` into
    it, and (where ``pools``) a 2x2 max-pool right after that (those modules become ``nn.Identity``:
    they have no state, so checkpoints are unchanged); model code that calls :func:`bn_relu` gets
    its ReLU fused too. The modules stay the same objects, so optimizers and references to their
    parameters stay valid. Returns how many batch norms were switched; 0 where the kernel cannot be
    built (``failure()`` says why). ``undo`` (a list) receives what :func:`unfuse` needs."""
    if load() is None:
        return 0
    count = 0
    for parent in model.modules():
        children = list(parent.named_children())
        # activations fold only where a Sequential runs its children in order (a subclass may not)
        in_order = isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward
        for i, (name, child) in enumerate(children):
            fused = FUSED_FORMS.get(type(child))
            if fused is None:  # SyncBatchNorm and other subclasses keep their own forward
                continue
            if undo is not None:
                undo.append((child, type(child)))
            child.__class__ = fused
            count += 1
            if not in_order:
                continue
            after = [m for _, m in children[i + 1:i + 3]] + [None, None]
            folded = []
            if type(after[0]) in _MODULES:
                child.activation = _MODULES[type(after[0])]
                folded.append(children[i + 1])
                after.pop(0)
            if pools and _max_pool_2x2(after[0]):
                child.pool = True
                folded.append(children[i + 1 + (child.activation is not None)])
            for name, module in folded:
                setattr(parent, name, nn.Identity())
                if undo is not None:
                    undo.append((parent, name, module))
    return count


def unfuse(undo: list) -> None:
    """Undo :func:`fuse_batch_norm`: the batch norms' own classes, the folded modules back."""
    for record in reversed(undo):
        if len(record) == 3:
            parent, name, module = record
            setattr(parent, name, module)
        else:
            module, cls = record
            module.__class__ = cls
            for attr in ("activation", "pool"):
                module.__dict__.pop(attr, None)
