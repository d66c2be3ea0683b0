"""Masked == pruned for every supported family, coupled channels, selects, and what the engine refuses."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import randomize_bn
from earlybird import EarlyBird, PruneError, apply_mask, apply_plan, channel_masks, create_model, prune_model, ModelSpec
from earlybird.cost import count_macs, count_params
from earlybird.prune import PrunePlan, SelectBatchNorm2d, prunable_layers


class UserNet(nn.Module):
    """A user's own model: a residual add and a concatenation."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12))
        self.left = nn.Sequential(nn.Conv2d(12, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(12, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(14, 10, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(10), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, num_classes))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.head(torch.cat([self.left(x), self.right(x)], 1))


def user_net(num_classes=5, in_channels=3):
    return UserNet(num_classes)


FAMILIES = {
    "vgg11": ModelSpec("vgg", 11, 0.125),
    "preresnet20": ModelSpec("preresnet", 20, 0.5),
    "resnet18": ModelSpec("resnet", 18, 0.125),
    "resnet50": ModelSpec("resnet", 50, 0.125),
    "mobilenetv2": ModelSpec("mobilenetv2", 0, 0.25),
    "densenet": ModelSpec("densenet", 10, 1.0),
    "user": ModelSpec("test_prune_families:user_net", 0, 1.0),
}


def macs_by_torch(model, shape):
    """An independent count: torch's own FLOP counter (2 FLOPs per multiply-accumulate)."""
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *shape))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("keep_streams", [False, True], ids=["streams-pruned", "streams-kept"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_equals_masked(family, keep_streams):
    torch.manual_seed(0)
    model = randomize_bn(create_model(FAMILIES[family])).eval()
    x = torch.randn(4, 3, 32, 32)
    layers = prunable_layers(model, x, keep_streams)
    detector = EarlyBird(model, [0.5], layers=layers)
    detector.step()
    mask = detector.layer_masks(0.5, detector.mask(0.5))
    pruned, plan = prune_model(model, mask, x, keep_streams=keep_streams)
    effective = plan.masks(model)
    masked = apply_mask(model, effective).eval()
    with torch.no_grad():
        want, got = masked(x), pruned.eval()(x)
    assert (got - want).abs().max() <= 1e-4 * (1 + want.abs().max())
    # the effective mask gives channels back (random scales rarely agree across a stream), and
    # removes unasked ones only where they are dead: zeroing them changes nothing, in either mode
    asked = torch.cat([~mask[n] for n in layers])
    went = torch.cat([~effective.get(n, torch.ones_like(mask[n])) for n in layers])
    assert int(went.sum()) > 0.25 * int(asked.sum()), (int(went.sum()), int(asked.sum()))
    unasked = {n: effective[n] | mask[n] for n in effective}
    if any(not torch.equal(unasked[n], effective[n]) for n in effective):
        assert family == "mobilenetv2"  # a depthwise BN masks what its expansion BN keeps
    for train in (False, True):
        a, b = apply_mask(model, unasked).train(train), apply_mask(model, effective).train(train)
        with torch.no_grad():
            assert torch.allclose(a(x), b(x), atol=1e-5)
    # physically smaller, and our MAC count agrees with torch's
    assert count_params(pruned) < count_params(model)
    shape = (3, 32, 32)
    assert count_macs(pruned, shape) < count_macs(model, shape)
    assert count_macs(pruned, shape) == macs_by_torch(pruned.eval(), shape)
    assert count_macs(model, shape) == macs_by_torch(model, shape)
    # the plan rebuilds the pruned architecture from a fresh dense model
    fresh = apply_plan(create_model(FAMILIES[family]), PrunePlan.from_dict(plan.to_dict()))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), got)


def test_coupled_stream_keeps_a_channel_any_member_needs():
    """ResNet-18: the stem BN, each block's last BN and the downsample BNs share the stream."""
    torch.manual_seed(0)
    model = randomize_bn(create_model(ModelSpec("resnet", 18, 0.125))).eval()
    stream = ["bn1", "layer1.0.bn2", "layer1.1.bn2"]
    mask = {n: torch.ones(8, dtype=torch.bool) for n in stream}
    mask["bn1"][[0, 1, 2]] = False
    mask["layer1.0.bn2"][[0, 1]] = False
    mask["layer1.1.bn2"][[0, 5]] = False  # only channel 0 is masked in all three
    pruned, plan = prune_model(model, mask, torch.randn(2, 3, 32, 32))
    assert all(plan.keep[n] == list(range(1, 8)) for n in stream)
    assert pruned.bn1.num_features == pruned.layer1[1].bn2.num_features == 7
    assert pruned.layer2[0].conv1.in_channels == pruned.layer2[0].downsample[0].in_channels == 7
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(pruned.eval()(x), apply_mask(model, plan.masks(model)).eval()(x), atol=1e-5)


def test_preresnet_readers_select_while_the_stream_stays():
    """PreResNet's block input BN reads the stream, which its raw downsample conv needs whole."""
    torch.manual_seed(0)
    model = randomize_bn(create_model(ModelSpec("preresnet", 20, 0.5))).eval()
    bn = model.layer1[1].bn1
    mask = {"layer1.1.bn1": torch.arange(bn.num_features) % 2 == 0}
    pruned, plan = prune_model(model, mask, torch.randn(2, 3, 32, 32))
    reader = pruned.layer1[1].bn1
    assert isinstance(reader, SelectBatchNorm2d) and plan.selects == ["layer1.1.bn1"]
    assert reader.in_channels == bn.num_features and reader.num_features == bn.num_features // 2
    assert pruned.layer1[1].conv1.in_channels == bn.num_features // 2
    assert pruned.layer1[0].conv3.out_channels == bn.num_features  # the stream is whole


def _mobilenet_block_mask(model):
    """Mask half of one block's depthwise BN channels, none of its expansion BN's."""
    block = model.features[3].conv
    width = block[1][1].num_features
    return block, {"features.3.conv.1.1": torch.arange(width) % 2 == 0}


def test_a_channel_that_feeds_only_masked_bns_goes_with_them():
    """MobileNetV2: what the depthwise BN masks, the expansion conv and BN need not compute."""
    torch.manual_seed(0)
    model = randomize_bn(create_model(ModelSpec("mobilenetv2", 0, 0.5))).eval()
    block, mask = _mobilenet_block_mask(model)
    width = block[1][1].num_features
    x = torch.randn(4, 3, 32, 32)
    pruned, plan = prune_model(model, mask, x)
    assert plan.selects == []
    assert plan.keep["features.3.conv.0.1"] == plan.keep["features.3.conv.1.1"] == list(range(0, width, 2))
    new = pruned.features[3].conv
    assert new[0][0].out_channels == new[1][0].in_channels == new[1][0].groups == new[2][0].in_channels == width // 2
    assert not any(isinstance(m, SelectBatchNorm2d) for m in pruned.modules())
    for train in (False, True):  # exact to the network the user masked, not just to the effective mask
        with torch.no_grad():
            want = apply_mask(model, mask).train(train)(x)
            assert torch.allclose(copy.deepcopy(pruned).train(train)(x), want, atol=1e-5)


def test_round_to_gives_back_a_dead_channel_to_every_member():
    torch.manual_seed(0)
    model = randomize_bn(create_model(ModelSpec("mobilenetv2", 0, 0.5))).eval()
    block, mask = _mobilenet_block_mask(model)
    width = block[1][1].num_features
    mask["features.3.conv.1.1"][: 3 * width // 8] = True  # 49 of the 72 left: not a multiple of 8
    x = torch.randn(2, 3, 32, 32)
    pruned, plan = prune_model(model, mask, x, round_to=8)
    kept = plan.keep["features.3.conv.1.1"]
    assert len(kept) % 8 == 0 and plan.keep["features.3.conv.0.1"] == kept
    assert set(kept) >= set(torch.nonzero(mask["features.3.conv.1.1"]).flatten().tolist())
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x), apply_mask(model, plan.masks(model)).eval()(x), atol=1e-5)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # ShuffleNet's channel shuffle
        return self.out(x)


def test_an_unsupported_op_is_refused_naming_the_layer():
    model = randomize_bn(Shuffle()).eval()
    with pytest.raises(PruneError, match=r"Transpose.*channels of 'bn'.*not supported"):
        prune_model(model, channel_masks(model, [0.5])[0.5], torch.randn(2, 3, 8, 8))


def test_round_to_keeps_multiples():
    torch.manual_seed(0)
    model = randomize_bn(create_model(ModelSpec("vgg", 11, 0.25))).eval()
    mask = channel_masks(model, [0.5])[0.5]
    x = torch.randn(2, 3, 32, 32)
    pruned, plan = prune_model(model, mask, x, round_to=8)
    widths = [m.num_features for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(w % 8 == 0 for w in widths), widths
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x), apply_mask(model, plan.masks(model)).eval()(x), atol=1e-5)



class Chains(nn.Module):
    """BN -> ReLU -> max-pool -> BN, and a BN that feeds a BN and a conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)  # a feeds only b
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_c, self.bn_d = nn.BatchNorm2d(8), nn.BatchNorm2d(8)  # c feeds d and the side conv
        self.side = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(8 + 4, 5)

    def forward(self, x):
        b = torch.relu(self.bn_b(F.max_pool2d(torch.relu(self.bn_a(self.conv(x))), 2)))
        c = torch.relu(self.bn_c(self.conv2(b)))
        return self.head(torch.cat([torch.relu(self.bn_d(c)), self.side(c)], 1).mean((2, 3)))


def test_dead_channels_follow_channelwise_paths_only():
    torch.manual_seed(0)
    model = randomize_bn(Chains()).eval()
    half = torch.arange(8) % 2 == 0
    mask = {"bn_b": half, "bn_d": half}  # a and c keep every channel of their own
    x = torch.randn(4, 3, 16, 16)
    pruned, plan = prune_model(model, mask, x)
    assert plan.keep["bn_a"] == plan.keep["bn_b"] == [0, 2, 4, 6]  # a's odd channels fed only b's masked ones
    assert "bn_c" not in plan.keep  # c's also reach the side conv: they stay
    assert pruned.conv.out_channels == 4 and pruned.bn_c.num_features == 8
    for train in (False, True):
        with torch.no_grad():
            want = apply_mask(model, mask).train(train)(x)
            assert torch.allclose(copy.deepcopy(pruned).train(train)(x), want, atol=1e-5)
