"""Pruned equals masked on every input, not only on the batch the plan was drawn on.

Whether a removed channel reaches a layer as a constant is decided from the model's structure: a
squeeze-and-excitation gate that saturates on the planning batch still varies on other inputs.
Every model here is planned from two N(0,1) images and compared in float64 (so that only the
engine's exactness is measured, not float32 rounding amplified through a random network) on the
planning batch and on inputs of other statistics."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from earlybird import EarlyBird, PruneError, create_model, prune_model
from earlybird.cost import count_macs
from earlybird.prune import channel_ties, engine, prunable_layers
from test_prune_families import FAMILIES
from test_zoo_models import _zoo

# a squeeze-and-excitation network of every family the zoo has
SE_ZOO = ["timm:efficientnet_b0", "timm:tf_efficientnet_b0", "timm:mobilenetv3_small_050",
          "torchvision:mobilenet_v3_small", "timm:seresnet18", "timm:regnety_002", "timm:ghostnet_100",
          "timm:rexnet_100"]


def calibrated(model: nn.Module, shape, seed: int = 0) -> nn.Module:
    """BN scales |N(0,1)|, shifts N(0, 0.5), running statistics of N(0,1) images: as trained, in float64."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.randn(m.num_features, generator=g).abs())
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the calibration batches
        model.train()
        for _ in range(3):
            model(torch.randn(8, *shape, generator=g))
    return model.eval().double()


def images(shape, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The planning batch (two N(0,1) images) and inputs of other statistics."""
    g = torch.Generator().manual_seed(seed)
    planning = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    noise = torch.randn(4, *shape, generator=g, dtype=torch.float64)
    smooth = F.interpolate(torch.randn(4, shape[0], 4, 4, generator=g, dtype=torch.float64) * 2, size=shape[1:],
                           mode="bilinear", align_corners=False)
    return planning, [2 * noise + 1, 3 * noise, noise - 2, smooth]


def assert_pruned_equals_masked(model: nn.Module, shape):
    x, others = images(shape)
    layers = prunable_layers(model, x)
    detector = EarlyBird(model, [0.5], layers=layers, ties=channel_ties(model, x))  # as `earlybird search`
    detector.step()
    pruned, plan = prune_model(model, detector.layer_masks(0.5, detector.mask(0.5)), x)
    masked = plan.masked(model).eval()
    with torch.no_grad():
        for inputs in (x, *others):
            want, got = masked(inputs), pruned.eval()(inputs)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max() / want.abs().max()
    assert count_macs(pruned, shape) < count_macs(model, shape)  # counted in the networks' float64 too
    return plan


@pytest.mark.parametrize("arch", SE_ZOO)
def test_squeeze_and_excitation_zoo_models_prune_exactly_on_every_input(arch):
    _zoo("torchvision")  # timm imports it
    source, name = arch.split(":")
    zoo = _zoo(source)
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=10) if source == "timm" else getattr(zoo.models, name)(num_classes=10)
    plan = assert_pruned_equals_masked(calibrated(model, (3, 64, 64)), (3, 64, 64))
    assert plan.zeroed  # the gates' channels: shifts zeroed, since a gate varies whatever the planning batch showed


@pytest.mark.parametrize("family", list(FAMILIES))
def test_in_tree_families_prune_exactly_on_every_input(family):
    spec = FAMILIES[family]
    torch.manual_seed(0)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    assert_pruned_equals_masked(calibrated(create_model(spec), shape), shape)


class SaturatedGate(nn.Module):
    """A gate that is 1 on N(0,1) images and 0 on brighter ones (sigmoid(20 - 40 * mean brightness)),
    multiplying the channels of a BN: on the planning batch the removed channels look constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.gate = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.gate.weight.fill_(-40 / 3)
            self.gate.bias.fill_(20)

    def forward(self, x):
        g = torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))
        return self.head(torch.relu(self.bn(self.conv(x))) * g).mean((2, 3))


def saturated():
    torch.manual_seed(0)
    model = SaturatedGate().eval().double()
    with torch.no_grad():
        model.bn.weight.copy_(torch.linspace(0.1, 1, 8))
        model.bn.bias.fill_(0.5)  # a removed channel emits relu(0.5) = 0.5 times the gate
    x, others = images((3, 16, 16))
    return model, x, others, {"bn": torch.arange(8) >= 4}


def test_a_gate_saturated_on_the_planning_batch_is_not_taken_for_a_constant():
    model, x, others, mask = saturated()
    with torch.no_grad():
        gate = torch.sigmoid(model.gate(x.mean((2, 3), keepdim=True)))
        assert (gate - 1).abs().max() < 1e-6  # the planning batch sees a constant 1
    pruned, plan = prune_model(model, mask, x)
    assert plan.zeroed == {"bn": [0, 1, 2, 3]} and "head" not in plan.folds  # zeroed, not folded as 0.5
    masked = plan.masked(model)
    with torch.no_grad():
        for inputs in (x, *others):
            assert torch.allclose(pruned(inputs), masked(inputs), rtol=0, atol=1e-12)


def test_a_constant_the_structure_misreads_fails_loudly_on_other_inputs(monkeypatch):
    # as if the graph said the gated channels were constants: the planning batch agrees (the gate is
    # saturated there), the inputs of other statistics do not, and the prune stops
    model, x, _, mask = saturated()
    real = engine._Reads.__call__
    monkeypatch.setattr(engine._Reads, "__call__", lambda self, expr: max(real(self, expr), engine.CONSTANT))
    with pytest.raises(PruneError, match="differs from the masked one by .* on inputs unlike the example batch"):
        prune_model(model, mask, x)


@pytest.mark.parametrize("training", [True, False])
def test_prune_model_returns_the_network_in_the_mode_it_was_given(training):
    # a framework that keeps modules' modes as it finds them (Lightning) retrains what prune_model returns
    model, x, _, mask = saturated()
    pruned, _ = prune_model(model.train(training), mask, x)
    assert pruned.training == model.training == training
    assert all(m.training == training for m in pruned.modules())
