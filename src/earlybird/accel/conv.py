"""Convolutions as one matrix product (im2col + GEMM) for the layers where that beats oneDNN.

On CPUs, oneDNN's convolutions of small images with many channels use the matrix units poorly:
VGG16's 512-channel layers at 4x4 and 2x2 (CIFAR size, batch 256, bf16) took 60% of its training
step, their weight gradient 3-13x as long as the same arithmetic as one matrix product. Here a
stride-1 convolution is that product: the input's k x k patches laid out as rows (channels-last
makes each patch row a few contiguous runs), times the weight viewed as a matrix. The input
gradient is the same operation on the output gradient with the flipped, transposed weight; the
weight gradient is the output gradient's transpose times the patches. Which layers gain depends on
the CPU and the shapes, so ``accel.tuning.gemm_convolutions`` times each layer both ways.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _patches(x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int],
             dilation: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """(rows, out_h, out_w): each output position's receptive field of the channels-last ``x``
    (N, C, H, W) as one row of kh * kw * C values (kernel position major, channel minor), zeros
    where it reaches into the padding."""
    n, c, h, w = x.shape
    (kh, kw), (ph, pw), (dh, dw) = kernel, padding, dilation
    padded = x.new_zeros(n, h + 2 * ph, w + 2 * pw, c)
    padded[:, ph:ph + h, pw:pw + w] = x.permute(0, 2, 3, 1)
    out_h, out_w = h + 2 * ph - dh * (kh - 1), w + 2 * pw - dw * (kw - 1)
    sn, sh, sw, sc = padded.stride()
    rows = padded.as_strided((n, out_h, out_w, kh, kw, c), (sn, sh, sw, dh * sh, dw * sw, sc))
    return rows.reshape(n * out_h * out_w, kh * kw * c), out_h, out_w


def _as_output(flat: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(N*H*W, C) rows as a channels-last (N, C, H, W) tensor, without a copy."""
    return flat.view(n, h, w, -1).permute(0, 3, 1, 2)


def _gemm(x, matrix, bias, kernel, padding, dilation) -> torch.Tensor:
    """``x``'s patch rows times ``matrix`` (kh * kw * C_in, C_out), plus ``bias``: a convolution."""
    rows, h, w = _patches(x, kernel, padding, dilation)
    flat = rows @ matrix if bias is None else torch.addmm(bias, rows, matrix)
    return _as_output(flat, x.shape[0], h, w)


def _forward(x, weight, bias, padding, dilation) -> torch.Tensor:
    # (O, C, kh, kw) as (O, kh * kw * C): a view of a channels-last weight, used transposed
    matrix = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).t()
    return _gemm(x, matrix, bias, weight.shape[2:], padding, dilation)


def _forward_part(x, weight, bias, padding, dilation, by_gemm: bool) -> torch.Tensor:
    """The forward, as GEMM or as torch's convolution."""
    return _forward(x, weight, bias, padding, dilation) if by_gemm else F.conv2d(x, weight, bias, 1, padding, dilation)


PARTS = ("forward", "input gradient", "weight gradient")


def _flat(grad: torch.Tensor) -> torch.Tensor:
    return grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])


def input_gradient(grad, weight, padding, dilation) -> torch.Tensor:
    """A stride-1 convolution's input gradient as a GEMM convolution: the channels-last output
    gradient, padded by what the forward's padding left out, convolved with the flipped weight,
    its channels swapped."""
    out, c, kh, kw = weight.shape
    back = tuple(d * (k - 1) - p for k, p, d in zip((kh, kw), padding, dilation))
    # rows (kernel position, output channel) of the flipped weight; the channels stay innermost, so
    # a channels-last weight is copied in runs of C (transposing it first took 13x as long)
    matrix = weight.permute(2, 3, 0, 1).flip(0, 1).reshape(kh * kw * out, c)
    return _gemm(grad, matrix, None, (kh, kw), back, dilation)


def weight_gradient(grad, x, weight_shape, padding, dilation) -> torch.Tensor:
    """The weight gradient: the output gradient's transpose times the input's patches."""
    rows, _, _ = _patches(x, weight_shape[2:], padding, dilation)
    out, c, kh, kw = weight_shape
    return (_flat(grad).t() @ rows).view(out, kh, kw, c).permute(0, 3, 1, 2)


class _GemmConv(torch.autograd.Function):
    """A stride-1 convolution whose parts (``PARTS``) each run as GEMM or, where ``gemm[i]`` is
    False, as torch's convolution (oneDNN)."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation, gemm):
        ctx.save_for_backward(x, weight)
        ctx.conf = padding, dilation, bias is not None, gemm
        return _forward_part(x, weight, bias, padding, dilation, gemm[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        padding, dilation, has_bias, gemm = ctx.conf
        grad = grad.contiguous(memory_format=torch.channels_last)
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        want_b = want_b and has_bias
        torch_parts = (want_x and not gemm[1], want_w and not gemm[2], False)
        grad_x = grad_w = grad_b = None
        if any(torch_parts):
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], list(padding), list(dilation), False, [0, 0], 1, list(torch_parts))
        if want_x and gemm[1]:
            grad_x = input_gradient(grad, weight, padding, dilation)
        if want_w and gemm[2]:
            grad_w = weight_gradient(grad, x, weight.shape, padding, dilation)
        if want_b:
            grad_b = _flat(grad).sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def gemm_eligible(conv: nn.Module) -> bool:
    """Whether ``conv`` is a convolution this module computes: a plain ``nn.Conv2d`` (or a
    ``GemmConv2d``) with stride 1, one group, zero padding of at most its reach, and a kernel
    larger than 1 x 1 (a 1 x 1 convolution already is one matrix product in oneDNN)."""
    return (type(conv) in (nn.Conv2d, GemmConv2d) and conv.stride == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and conv.kernel_size != (1, 1)
            and all(p <= d * (k - 1) for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation)))


def _names(parts) -> str:
    return "+".join(p for p, on in zip(PARTS, parts) if on)


class GemmConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward, input gradient and weight gradient run as im2col + GEMM for
    channels-last CPU inputs where ``gemm`` says so: per compute type (fp32, or the autocast type),
    one flag per part in the order of ``PARTS``. torch's convolution serves the other parts, types
    and inputs. Same parameters and state dict as ``nn.Conv2d``; made from one in place
    (``to_gemm``), for layers :func:`gemm_eligible` accepts."""

    gemm: dict[torch.dtype, tuple[bool, bool, bool]]

    def extra_repr(self) -> str:
        return super().extra_repr() + ", gemm=" + "; ".join(
            f"{str(dtype).removeprefix('torch.')}: {_names(parts)}" for dtype, parts in self.gemm.items())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last)
                or torch.compiler.is_compiling()):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        parts = self.gemm.get(x.dtype)
        if parts is None or x.dtype != weight.dtype:
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            if not torch.is_grad_enabled():  # evaluation: the forward alone, without autograd's bookkeeping
                return _forward_part(x, weight, bias, self.padding, self.dilation, parts[0])
            return _GemmConv.apply(x, weight, bias, self.padding, self.dilation, parts)


def to_gemm(conv: nn.Conv2d, dtype: torch.dtype, parts: tuple[bool, bool, bool] = (True, True, True)) -> None:
    """Make ``conv`` (which :func:`gemm_eligible` accepts) a :class:`GemmConv2d` that computes
    ``parts`` as GEMM when it runs in ``dtype`` (its choices for other types stay), in place."""
    if not gemm_eligible(conv):
        raise ValueError(f"{conv} is not a stride-1, single-group, zero-padded k x k convolution")
    if len(parts) != len(PARTS) or not any(parts):
        raise ValueError(f"parts takes one flag per part of {PARTS}, at least one of them on, not {parts}")
    if type(conv) is not GemmConv2d:
        conv.__class__ = GemmConv2d
        conv.gemm = {}
    conv.gemm[dtype] = tuple(bool(p) for p in parts)


def keep_gemm(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Drop every ``GemmConv2d``'s choices but those for ``dtype`` (the type training settled on;
    None: drop them all), making a layer left with none an ``nn.Conv2d`` again; returns how many
    layers still use GEMM."""
    count = 0
    for m in model.modules():
        if type(m) is GemmConv2d:
            m.gemm = {dtype: m.gemm[dtype]} if dtype in m.gemm else {}
            if m.gemm:
                count += 1
            else:
                m.__class__ = nn.Conv2d
                del m.gemm
    return count


def part_runs(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, padding, dilation) -> list[tuple]:
    """For each of ``PARTS``: (torch's way, the GEMM way) of computing it for these channels-last
    tensors, as functions of no arguments, to time them side by side."""
    padding, dilation = tuple(padding), tuple(dilation)

    def torch_backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            grad, x, weight, None, [1, 1], list(padding), list(dilation), False, [0, 0], 1, mask)

    return [
        tuple(lambda by_gemm=by_gemm: _forward_part(x, weight, None, padding, dilation, by_gemm)
              for by_gemm in (False, True)),
        (torch_backward([True, False, False]), lambda: input_gradient(grad, weight, padding, dilation)),
        (torch_backward([False, True, False]), lambda: weight_gradient(grad, x, weight.shape, padding, dilation)),
    ]
