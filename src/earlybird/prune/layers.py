"""The layers a pruned network may need beyond torch's own, and their Torch-Pruning handlers.

* :class:`ConstantFoldConv2d`: a zero-padded conv that also adds the fixed contribution of removed
  input channels which carried a constant (a masked BN's shift through its activation).
* :class:`SelectBatchNorm2d`: a BN that first gathers some of its input channels. It lets a branch
  that *reads* a residual stream (a pre-activation BN) drop channels while the stream keeps them,
  like the reference's ``channel_selection``, but without its host sync. Its gather keeps a
  channels-last input channels-last.
* :class:`SelectConv2d`: a conv that first gathers some of its input channels: a post-activation
  block's conv1 reading part of a stream the network keeps whole (the reference's pruned ImageNet
  ResNet-18/34, imported), at the MACs of the channels it reads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn



def select_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(1, index)`` that keeps a channels-last ``x`` channels-last (torch's returns
    a contiguous tensor, and every layer after it would convert back)."""
    if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return x.index_select(1, index)
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(-1, c).index_select(1, index).view(n, h, w, -1).permute(0, 3, 1, 2)


class ConstantFoldConv2d(nn.Conv2d):
    """A conv plus the fixed contribution of removed constant input channels.

    ``fold_kernel`` (out_channels x 1 x kh x kw) is sum_c a_c * W[:, c] over the removed
    channels c with constant value a_c; convolving it with an all-ones image under the conv's
    own padding reproduces exactly what those channels added, borders included.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        self.register_buffer("fold_kernel", torch.zeros(self.out_channels, 1, kh, kw))
        self._fold_cache: dict = {}

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "ConstantFoldConv2d":
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        new.load_state_dict(conv.state_dict(), strict=False)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + ", constant_fold=True"

    def _fold(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(1, 1, height, width, device=like.device, dtype=like.dtype)
        return F.conv2d(ones, self.fold_kernel.to(like.dtype), None, self.stride, self.padding, self.dilation)

    def fold_map(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # torch.compile and torch.export trace the map as one small conv: the cache's key (data
            # pointers, versions, inference mode) would break the graph in every fold conv and
            # recompile per block shape, and a fake tensor has no data pointer at all
            return self._fold(height, width, like)
        kernel = self.fold_kernel  # the key changes when the kernel is replaced, sliced or loaded into
        key = (height, width, like.device, like.dtype, kernel.data_ptr(), tuple(kernel.shape), kernel._version,
               torch.is_inference_mode_enabled())  # a map made in inference mode cannot serve autograd
        if key not in self._fold_cache:
            self._fold_cache = {key: self._fold(height, width, like)}
        return self._fold_cache[key]

    def forward(self, x):
        # in place: the convolution's backward does not need its output, and a new tensor costs a pass
        return super().forward(x).add_(self.fold_map(x.shape[-2], x.shape[-1], x))


class SelectBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the input channels listed in ``index`` (a buffer: it moves with the model)."""

    def __init__(self, num_features: int, *args, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.register_buffer("index", torch.arange(num_features, device=self.weight.device))
        self.in_channels = num_features

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "SelectBatchNorm2d":
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  device=bn.weight.device, dtype=bn.weight.dtype)
        new.load_state_dict(bn.state_dict(), strict=False)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + f", selects {self.num_features} of {self.in_channels} input channels"

    def forward(self, x):
        return super().forward(select_channels(x, self.index))


class SelectConv2d(nn.Conv2d):
    """Conv2d over the input channels listed in ``index`` (a buffer); ``in_channels`` counts those
    it reads, ``stream_channels`` those its input has."""

    def __init__(self, in_channels: int, *args, **kwargs):
        super().__init__(in_channels, *args, **kwargs)
        self.register_buffer("index", torch.arange(in_channels, device=self.weight.device))
        self.stream_channels = in_channels

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "SelectConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                  dtype=conv.weight.dtype)
        new.load_state_dict(conv.state_dict(), strict=False)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + f", reads {self.in_channels} of {self.stream_channels} input channels"

    def forward(self, x):
        return super().forward(select_channels(x, self.index))


class _SelectConvPruner(tp.pruner.function.ConvPruner):
    """Input channels pruned from a select conv are stream channels it no longer reads: its weight
    loses their columns, its index their entries; the stream keeps them."""

    def prune_in_channels(self, layer: SelectConv2d, idxs):
        gone = torch.tensor(sorted(int(i) for i in idxs), dtype=layer.index.dtype, device=layer.index.device)
        keep = torch.nonzero(~torch.isin(layer.index, gone)).flatten()
        layer.weight = nn.Parameter(layer.weight.detach()[:, keep.to(layer.weight.device)].contiguous())
        layer.index = layer.index[keep]
        layer.in_channels = int(keep.numel())
        return layer


class _FoldConvPruner(tp.pruner.function.ConvPruner):
    """Also slices the fold kernel when output channels go."""

    def prune_out_channels(self, layer: ConstantFoldConv2d, idxs):
        kept = sorted(set(range(layer.out_channels)) - set(int(i) for i in idxs))
        layer.fold_kernel = layer.fold_kernel[kept].contiguous()
        return super().prune_out_channels(layer, idxs)


class _SelectBNPruner(tp.pruner.function.BatchnormPruner):
    """Output channels (the BN's own) and input channels (the stream it reads) prune independently."""

    def prune_out_channels(self, layer: SelectBatchNorm2d, idxs):
        kept = sorted(set(range(layer.num_features)) - set(int(i) for i in idxs))
        layer.index = layer.index[kept]
        return super().prune_out_channels(layer, idxs)

    def prune_in_channels(self, layer: SelectBatchNorm2d, idxs):
        removed = torch.tensor(sorted(int(i) for i in idxs), dtype=layer.index.dtype, device=layer.index.device)
        if torch.isin(layer.index, removed).any():
            raise RuntimeError("a selected input channel is being removed: prune the BN's outputs first")
        layer.index = layer.index - torch.searchsorted(removed, layer.index)  # shift past removed channels
        layer.in_channels -= len(removed)
        return layer

    def get_in_channels(self, layer: SelectBatchNorm2d):
        return layer.in_channels


CUSTOM_PRUNERS = {ConstantFoldConv2d: _FoldConvPruner(), SelectBatchNorm2d: _SelectBNPruner(),
                  SelectConv2d: _SelectConvPruner()}
