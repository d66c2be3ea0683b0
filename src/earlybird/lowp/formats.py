"""Low-precision number formats simulated in float32 with plain PyTorch ops (CPU and GPU alike).

* :class:`BlockFloat`: block floating point. Every block (one slice along ``dim``; the whole tensor
  when ``dim`` is None) shares one exponent, that of its largest magnitude; each value keeps a
  ``wl``-bit signed mantissa, saturating at +-(2^(wl-1) - 1) steps.

Rounding is ``nearest`` or ``stochastic`` (floor(x / step + u), u uniform in [0, 1): unbiased).
Nearest rounding breaks ties upwards, as QPyTorch's CPU kernel does, so results match it bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

ROUNDINGS = ("stochastic", "nearest")


@dataclass(frozen=True)
class BlockFloat:
    wl: int
    dim: int | None = 0

    def __post_init__(self):
        if not 2 <= self.wl <= 24:
            raise ConfigError(f"block floating point needs 2..24 mantissa bits, not {self.wl}")

    @property
    def bits(self) -> int:
        return self.wl

    def describe(self) -> str:
        where = "per tensor" if self.dim is None else f"one exponent per slice of dim {self.dim}"
        return f"BFP{self.wl} ({where})"


def uniform15(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform numbers (k + 1/2) / 2^15 from 15 random bits each: four per 64-bit draw (whose top bit
    is always 0, hence 15 and not 16), several times cheaper than torch.rand on a CPU. Rounding with
    them is unbiased for every value on a 2^-15 grid of the step, and within 2^-16 steps otherwise."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(generator=generator)
    bits = words.view(torch.int16)[:n].view(shape) & 0x7FFF
    return bits.float().add_(0.5).mul_(2.0 ** -15)


def _round(t: torch.Tensor, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    """Round ``t`` (a fresh tensor: it may be overwritten) to integers, ties upwards when nearest."""
    if rounding == "stochastic":
        return t.add_(uniform15(t.shape, generator, t.device)).floor_()
    return t.add_(0.5).floor_()


def _exponent(x: torch.Tensor) -> torch.Tensor:
    """floor(log2|x|) exactly (frexp), as float; 0 maps to a very small exponent."""
    return (torch.frexp(x)[1] - 1).to(x.dtype)


def _block_max(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    if dim is None or x.dim() == 0:
        return x.abs().amax()
    moved = x.abs().transpose(0, dim) if dim else x.abs()
    m = moved.reshape(moved.shape[0], -1).amax(1)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    return m.view(shape)


def quantize(x: torch.Tensor, fmt, rounding: str = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` rounded to the nearest representable values of ``fmt`` (float32 in, float32 out)."""
    if rounding not in ROUNDINGS:
        raise ConfigError(f"--rounding {rounding} is not one of {', '.join(ROUNDINGS)}")
    x = x.float()
    # Steps are powers of two, so scaling by them and by their inverses is exact.
    if isinstance(fmt, BlockFloat):
        big = _block_max(x, fmt.dim)
        exponent = torch.where(big > 0, _exponent(big), torch.zeros_like(big))  # an all-zero block stays zero
        top = 2.0 ** (fmt.wl - 1) - 1
        t = _round(x * torch.exp2(fmt.wl - 2 - exponent), rounding, generator).clamp_(-top, top)
        return t.mul_(torch.exp2(exponent - (fmt.wl - 2)))
    raise TypeError(f"unknown number format {fmt!r}")
