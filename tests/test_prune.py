import time

import pytest
import torch
from torch import nn

from conftest import randomize_bn
from earlybird import PruneError, apply_mask, apply_plan, channel_masks, create_model, prune_model, ModelSpec
from earlybird.accel.tuning import inference_side_by_side
from earlybird.cost import count_macs, count_params
from earlybird.prune import ConstantFoldConv2d, PrunePlan


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_pruned_vgg_equals_masked_dense_vgg(small_vgg, ratio):
    mask = channel_masks(small_vgg, [ratio])[ratio]
    x = torch.randn(4, 3, 32, 32)
    pruned, plan = prune_model(small_vgg, mask, x)
    masked = apply_mask(small_vgg, mask).eval()
    with torch.no_grad():
        want, got, dense = masked(x), pruned.eval()(x), small_vgg(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(dense, want, atol=1e-3)  # the mask really changed the function
    # physically smaller: the kept channel counts are the real tensor shapes
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [b.num_features for b in bns] == [len(v) for v in plan.keep.values()]
    assert sum(len(v) for v in plan.keep.values()) == int(mask.sum())
    assert convs[0].in_channels == 3 and pruned.classifier.out_features == 10
    assert count_params(pruned) < count_params(small_vgg)
    assert count_macs(pruned, (3, 32, 32)) < count_macs(small_vgg, (3, 32, 32))


def test_original_model_is_left_untouched(small_vgg):
    before = {k: v.clone() for k, v in small_vgg.state_dict().items()}
    prune_model(small_vgg, channel_masks(small_vgg, [0.5])[0.5], torch.randn(2, 3, 32, 32))
    after = small_vgg.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plan_rebuilds_the_pruned_architecture_from_the_dense_one(small_vgg):
    mask = channel_masks(small_vgg, [0.6])[0.6]
    x = torch.randn(3, 3, 32, 32)
    pruned, plan = prune_model(small_vgg, mask, x)
    plan = PrunePlan.from_dict(plan.to_dict())
    fresh = apply_plan(create_model(ModelSpec("vgg", 11, 0.125, 3, 10, 32)), plan)
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned.eval()(x))


def test_a_mask_that_empties_a_layer_is_refused(small_vgg):
    mask = channel_masks(small_vgg, [0.3])[0.3]
    first = small_vgg.features[1].num_features
    mask[:first] = False
    with pytest.raises(PruneError, match="all .* channels of layer 'features.1'"):
        prune_model(small_vgg, mask, torch.randn(2, 3, 32, 32))


def test_a_mask_of_the_wrong_length_is_refused(small_vgg):
    with pytest.raises(PruneError, match="another architecture"):
        prune_model(small_vgg, torch.ones(7, dtype=torch.bool), torch.randn(2, 3, 32, 32))


class Mixed(nn.Module):
    """Consumers of every fold kind: padded conv (map), unpadded conv and reflect padding (bias), linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 1, bias=True)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=False)
        self.b3 = nn.BatchNorm2d(8)
        self.c4 = nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False)
        self.b4 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = nn.functional.silu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        x = torch.relu(self.b4(self.c4(x)))
        return self.fc(x.flatten(1))


def test_folds_are_exact_for_every_consumer_kind():
    torch.manual_seed(1)
    model = randomize_bn(Mixed(), seed=3).eval()
    model.b1.bias.data.abs_()  # removed channels must reach c2 through the ReLU as non-zero constants
    mask = channel_masks(model, [0.4])[0.4]
    x = torch.randn(5, 2, 8, 8)
    pruned, plan = prune_model(model, mask, x)
    assert plan.folds == {"c2": "bias", "c3": "bias", "c4": "map", "fc": "bias"}
    assert isinstance(pruned.c4, ConstantFoldConv2d)
    # a flatten consumer loses whole channel blocks of the linear input
    assert pruned.fc.in_features == 16 * pruned.b4.num_features
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x), apply_mask(model, mask).eval()(x), atol=1e-5, rtol=1e-4)
        # and at another input size: the fold map follows the image size
        y = torch.randn(2, 2, 8, 8)
        assert torch.allclose(pruned(y), apply_mask(model, mask).eval()(y), atol=1e-5, rtol=1e-4)


def test_channels_that_reach_a_layer_as_zeros_leave_it_plain():
    """A ReLU after a non-positive BN shift makes a removed channel a zero: nothing to fold, no extra pass."""
    model = randomize_bn(Mixed(), seed=3).eval()
    model.b1.bias.data = -model.b1.bias.data.abs()
    mask = channel_masks(model, [0.4])[0.4]
    x = torch.randn(5, 2, 8, 8)
    pruned, plan = prune_model(model, mask, x)
    assert pruned.c2.in_channels < 8 and "c2" not in plan.folds and type(pruned.c2) is nn.Conv2d
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x), apply_mask(model, mask).eval()(x), atol=1e-5, rtol=1e-4)


def test_fold_map_gradients_equal_the_masked_networks():
    """The fold is added in place to the convolution's output: gradients must not notice."""
    torch.manual_seed(1)
    model = randomize_bn(Mixed(), seed=3).eval()
    model.b1.bias.data.abs_()
    mask = channel_masks(model, [0.4])[0.4]
    x = torch.randn(5, 2, 8, 8)
    pruned, plan = prune_model(model, mask, x)
    masked = apply_mask(model, plan.masks(model)).eval()
    assert isinstance(pruned.c4, ConstantFoldConv2d)
    pruned.eval()(x).square().sum().backward()
    masked(x).square().sum().backward()
    kept = torch.tensor(plan.keep["b4"])
    assert torch.allclose(pruned.b4.weight.grad, masked.b4.weight.grad[kept], atol=1e-4, rtol=1e-3)
    assert torch.allclose(pruned.fc.bias.grad, masked.fc.bias.grad, atol=1e-4, rtol=1e-3)


def test_pruned_model_trains():
    model = randomize_bn(create_model(ModelSpec("vgg", 11, 0.125, 3, 10, 32)))
    pruned, _ = prune_model(model, channel_masks(model, [0.5])[0.5], torch.randn(2, 3, 32, 32))
    pruned.train()
    loss = pruned(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in pruned.parameters())


def test_dense_and_pruned_inference_is_timed_in_turns():
    calls = []

    class Sleeper(nn.Module):  # a forward of known length
        def __init__(self, name, seconds):
            super().__init__()
            self.name, self.seconds = name, seconds

        def forward(self, x):
            calls.append(self.name)
            time.sleep(self.seconds)
            return x

    slow, fast = Sleeper("dense", 0.02), Sleeper("pruned", 0.005)
    dense, pruned = inference_side_by_side([slow, fast], (3, 4, 4), 8, "cpu", rounds=3, min_seconds=0.03)
    assert 8 / 0.02 / 1.5 < dense < 8 / 0.02 and 8 / 0.005 / 1.5 < pruned < 8 / 0.005
    # each round (a warm-up round, then three timed): one model's warm-up and timed forwards, then the other's
    rounds = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert rounds == ["dense", "pruned"] * 4
