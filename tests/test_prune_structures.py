"""The structures of torchvision's and timm's BN CNNs, in small in-tree modules: a grouped bottleneck
(ResNeXt, RegNet), squeeze-and-excitation with SiLU/Hardswish and sigmoid/hardsigmoid gates
(MobileNetV3, EfficientNet), a BN with its activation inside (timm's BatchNormAct2d), a padded
average-pool branch (Inception), a channel split and shuffle (ShuffleNetV2) and a split-concat res2
block (Res2Net). Each is pruned = masked with fewer MACs, or refused in one line."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_bn
from earlybird import EarlyBird, ModelSpec, PruneError, create_model, prune_model
from earlybird.cost import count_macs
from earlybird.prune import PrunePlan, apply_plan, channel_ties, plan_pruning, prunable_layers


def conv_bn(cin, cout, k=1, stride=1, groups=1, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act() if act else nn.Identity())


class Grouped(nn.Module):
    """ResNeXt's bottleneck: 1x1 -> grouped 3x3 (4 groups) -> 1x1, with a residual stream."""

    def __init__(self, width=16, groups=4):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.a, self.b = conv_bn(16, width), conv_bn(width, width, 3, groups=groups)
        self.c = conv_bn(width, 16, act=None)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.c(self.b(self.a(x))))
        return self.head(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels, act, gate):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, 8, 1), nn.Conv2d(8, channels, 1)
        self.act, self.gate = act(), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class InvertedSE(nn.Module):
    """MobileNetV3 / EfficientNet: expand -> depthwise -> SE gate -> project."""

    def __init__(self, act=nn.Hardswish, gate=nn.Hardsigmoid):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, act=act)
        self.expand = conv_bn(16, 32, act=act)
        self.dw = conv_bn(32, 32, 3, groups=32, act=act)
        self.se = SqueezeExcite(32, act, gate)
        self.project = conv_bn(32, 16, act=None)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        return self.head(x.mean((2, 3)))


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: the BN and its activation in one module (F.batch_norm inside)."""

    def __init__(self, channels):
        super().__init__(channels)
        self.act = nn.SiLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


class WithBatchNormAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), BatchNormAct(16)
        self.c2, self.n2 = nn.Conv2d(16, 24, 3, padding=1, bias=False), BatchNormAct(24)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.n2(self.c2(self.n1(self.c1(x)))).mean((2, 3)))


class PoolBranch(nn.Module):
    """Inception's branch_pool: a zero-padded 3x3 average pool (count_include_pad) before a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.branch1 = conv_bn(16, 8)
        self.branch_pool = conv_bn(16, 8)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1)
        return self.head(torch.cat([self.branch1(x), self.branch_pool(pooled)], 1).mean((2, 3)))


class Shuffle(nn.Module):
    """ShuffleNetV2's unit: split the channels in two, transform one half, concatenate, shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.branch = nn.Sequential(conv_bn(8, 8), conv_bn(8, 8, 3, groups=8, act=None), conv_bn(8, 8))
        self.tail = conv_bn(16, 24)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        left, right = x.chunk(2, dim=1)
        x = torch.cat([left, self.branch(right)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(self.tail(x).mean((2, 3)))


class Res2(nn.Module):
    """Res2Net's block: split into 4 widths, each 3x3 conv adds the previous output, concatenate."""

    def __init__(self, width=6, scales=4):
        super().__init__()
        self.width = width
        self.stem = conv_bn(3, width * scales, 1)
        self.convs = nn.ModuleList(conv_bn(width, width, 3) for _ in range(scales - 1))
        self.out = conv_bn(width * scales, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        parts = torch.split(self.stem(x), self.width, 1)
        outs, y = [], None
        for i, conv in enumerate(self.convs):
            y = conv(parts[i] if y is None else y + parts[i])
            outs.append(y)
        outs.append(parts[-1])
        return self.head(self.out(torch.cat(outs, 1)).mean((2, 3)))


class SlicedStream(nn.Module):
    """ReXNet's block: the residual is added to the first channels of a wider output (a slice)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.body = nn.Sequential(conv_bn(16, 32), conv_bn(32, 24, act=None))
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.body(x)
        y = torch.cat([y[:, :16] + x, y[:, 16:]], 1)
        return self.head(y.mean((2, 3)))


def _prune_half(model, x):
    """The search's 50% ticket (tied channels ranked as one) pruned; checks pruned = masked."""
    layers = prunable_layers(model, x)
    detector = EarlyBird(model, [0.5], layers=layers, ties=channel_ties(model, x))
    detector.step()
    pruned, plan = prune_model(model, detector.layer_masks(0.5, detector.mask(0.5)), x)
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)) * 3  # not the batch it was planned on
    for batch in (x, other):
        with torch.no_grad():
            want, got = plan.masked(model).eval()(batch), pruned.eval()(batch)
        assert (got - want).abs().max() <= 1e-4 * (1 + want.abs().max())
    shape = tuple(x.shape[1:])
    assert count_macs(pruned, shape) < count_macs(model, shape)
    # the plan rebuilds the pruned architecture (a checkpoint holds only the plan and tensors)
    fresh = apply_plan(type(model)(*getattr(model, "_args", ())), PrunePlan.from_dict(plan.to_dict()))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))
    return pruned, plan


@pytest.fixture
def x():
    # samples of different scales: a gate (squeeze-and-excitation) then differs from sample to sample
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(4, 1, 1, 1)
    return torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * scale


def test_grouped_convolutions_lose_a_position_in_every_group(x):
    torch.manual_seed(0)
    model = randomize_bn(Grouped()).eval()
    ties = channel_ties(model, x)
    # input side: b's input channel p of each of the 4 groups (a's BN); output side: b's BN
    assert sorted(len(t) for t in ties) == [4] * 8
    assert {n for t in ties for n, _ in t} == {"a.1", "b.1"}
    assert all(len({c % 4 for _, c in t}) == 1 for t in ties)
    # a mask removing one position in one group only cannot be carried out: the position stays
    keep = {"a.1": torch.ones(16, dtype=torch.bool)}
    keep["a.1"][1] = False
    assert plan_pruning(model, keep, x).keep == {}
    keep["a.1"][[1, 5, 9, 13]] = False  # the position in every group goes
    pruned, plan = prune_model(model, keep, x)
    assert plan.keep == {"a.1": [c for c in range(16) if c % 4 != 1]}
    assert pruned.b[0].in_channels == 12 and pruned.b[0].groups == 4 and pruned.b[0].weight.shape[1] == 3
    _, plan = _prune_half(model, x)
    assert any(n.startswith("b.") for n in plan.keep)  # the grouped layer itself shrank


@pytest.mark.parametrize("act, gate", [(nn.SiLU, nn.Sigmoid), (nn.Hardswish, nn.Hardsigmoid), (nn.ReLU, nn.Sigmoid)])
def test_squeeze_excitation_channels_go_with_their_shift_zeroed(x, act, gate):
    torch.manual_seed(0)
    model = randomize_bn(InvertedSE(act, gate)).eval()
    model._args = (act, gate)
    _, plan = _prune_half(model, x)
    # a masked depthwise channel emits act(shift) * gate(x): only a zero is the same for every input
    assert plan.zeroed and set(plan.zeroed) <= {"expand.1", "dw.1"}
    assert all(c not in plan.keep.get(n, []) for n, chans in plan.zeroed.items() for c in chans)


def test_a_bn_with_its_activation_inside_is_a_bn(x):
    torch.manual_seed(0)
    model = randomize_bn(WithBatchNormAct()).eval()
    assert prunable_layers(model, x) == ["n1", "n2"]
    _, plan = _prune_half(model, x)
    assert not plan.zeroed  # SiLU(shift) is a constant, folded into the next conv


def test_a_padded_average_pool_branch_zeroes_shifts(x):
    torch.manual_seed(0)
    model = randomize_bn(PoolBranch()).eval()
    _, plan = _prune_half(model, x)
    # the stem feeds a zero-padded average pool: a constant is no longer one at the borders
    assert "stem.1" in plan.zeroed


def test_channel_split_and_shuffle_are_left_out_in_one_line(x):
    torch.manual_seed(0)
    model = randomize_bn(Shuffle()).eval()
    layers = prunable_layers(model, x)
    assert layers and "stem.1" not in layers and "tail.1" in layers  # the rest still prunes
    with pytest.raises(PruneError) as refused:
        prune_model(model, {"stem.1": torch.arange(16) % 2 == 0}, x)
    assert len(str(refused.value).splitlines()) == 1 and "'stem.1'" in str(refused.value)
    _prune_half(model, x)


def test_a_res2_block_is_pruned_exactly_or_refused_in_one_line(x):
    torch.manual_seed(0)
    model = randomize_bn(Res2()).eval()
    try:
        layers = prunable_layers(model, x)
    except PruneError as exc:  # refused as a whole: one line, naming what it could not follow
        assert len(str(exc).splitlines()) == 1
        return
    assert "out.1" in layers
    _prune_half(model, x)


def test_a_slice_that_meets_a_stream_is_left_out_at_once(x):
    torch.manual_seed(0)
    model = randomize_bn(SlicedStream()).eval()
    layers = prunable_layers(model, x)
    # the stream's BNs reach x[:, :16] + shortcut: Torch-Pruning takes seconds per channel there
    assert "body.0.1" in layers and "stem.1" not in layers and "body.1.1" not in layers
    with pytest.raises(PruneError, match="slice of a channel stream"):
        prune_model(model, {"stem.1": torch.arange(16) % 2 == 0}, x)
    _prune_half(model, x)


def test_the_dense_graph_is_traced_once_for_layers_ties_producers_and_plans(monkeypatch):
    from earlybird.prune import channel_producers, engine

    traced = []
    real = engine._graph
    monkeypatch.setattr(engine, "_graph", lambda model, example: traced.append(model) or real(model, example))
    torch.manual_seed(0)
    model = create_model(ModelSpec("resnet", 18, 0.0625, 3, 10, 32))
    x = torch.randn(2, 3, 32, 32)
    layers = prunable_layers(model, x)
    channel_ties(model, x), channel_producers(model, x)
    mask = {n: torch.rand(model.get_submodule(n).weight.numel()) > 0.5 for n in layers}
    for name, keep in mask.items():
        keep[0] = True
    plan_pruning(model, mask, x)
    assert sum(m is model for m in traced) == 1  # the dense model: one trace for all four
    with torch.no_grad():  # weights do not change the structure: still no new trace
        model.conv1.weight.mul_(2)
    plan_pruning(model, mask, x)
    assert sum(m is model for m in traced) == 1
    small, _ = prune_model(model, mask, x)
    prunable_layers(small, x)  # another structure: traced anew
    assert sum(m is small for m in traced) == 1
