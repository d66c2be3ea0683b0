"""Low-precision formats (grids, saturation, unbiased and reproducible stochastic rounding, QPyTorch
agreement), where the quantizers sit in training, SWA, and a low-precision run end to end."""
import json
import math

import pytest
import torch
from torch import nn

from conftest import randomize_bn
from earlybird import ModelSpec, create_model
from earlybird.errors import ConfigError
from earlybird.lowp import BlockFloat, LowPrecision, Precision, SWA, quantize
from test_cli import cli

FORMATS = [BlockFloat(8, 0), BlockFloat(4, None), BlockFloat(6, 1), BlockFloat(3, 0)]


def sample(seed=0, shape=(48, 20)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-10, 10, (shape[0], 1), generator=g).float())
    x[5] = 0.0
    return x


def reference(v: float, fmt, block_max: float) -> float:
    """An independent, per-element statement of block floating point's nearest rounding (ties up, as
    QPyTorch)."""
    if block_max == 0:
        return 0.0
    step = 2.0 ** (math.frexp(block_max)[1] - 1 - (fmt.wl - 2))
    top = 2 ** (fmt.wl - 1) - 1
    return min(max(math.floor(v / step + 0.5), -top), top) * step


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_nearest_rounding_matches_an_independent_formula(fmt):
    x = sample()
    q = quantize(x, fmt)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            block = x.abs().max() if fmt.dim is None else (x[i].abs().max() if fmt.dim == 0 else x[:, j].abs().max())
            assert q[i, j].item() == reference(x[i, j].item(), fmt, float(block)), (i, j, x[i, j].item())
    assert torch.equal(quantize(q, fmt), q)  # the result is on the grid: rounding it again changes nothing


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_matches_qtorch_bit_for_bit(fmt):
    try:
        from qtorch.quant import block_quantize
    except Exception as exc:  # not installed, or its C++ extension does not build here
        pytest.skip(f"qtorch unavailable: {exc}")
    x = sample(1)
    want = block_quantize(x, fmt.wl, dim=-1 if fmt.dim is None else fmt.dim, rounding="nearest")
    assert torch.equal(quantize(x, fmt), want)


def test_saturation_at_the_largest_value():
    # a block shares the exponent of its largest value: the small ones lose their bits
    assert quantize(torch.tensor([100.0, 0.3, -0.4]), BlockFloat(8, None)).tolist() == [100.0, 0.0, -0.0]


@pytest.mark.parametrize("fmt", [BlockFloat(8, 0), BlockFloat(4, 0)], ids=str)
def test_stochastic_rounding_is_unbiased_and_reproducible(fmt):
    n = 200_000
    # values between grid points, in blocks whose largest value fixes the step
    x = torch.full((n, 2), 0.3)
    x[:, 1] = 1.0
    q = quantize(x, fmt, "stochastic", torch.Generator().manual_seed(5))
    lo, hi = quantize(torch.tensor([[0.3, 1.0]]), fmt)[0, 0], None
    values = set(q[:, 0].unique().tolist())
    assert len(values) == 2  # only the two neighbouring grid points
    hi = max(values)
    lo = min(values)
    mean, sd = q[:, 0].mean().item(), (hi - lo) / 2 / math.sqrt(n)
    assert abs(mean - 0.3) < 5 * sd
    again = quantize(x, fmt, "stochastic", torch.Generator().manual_seed(5))
    other = quantize(x, fmt, "stochastic", torch.Generator().manual_seed(6))
    assert torch.equal(q, again) and not torch.equal(q, other)


def test_bad_formats_are_refused():
    with pytest.raises(ConfigError, match="2..24"):
        BlockFloat(1)
    with pytest.raises(ConfigError, match="rounding"):
        quantize(torch.ones(2), BlockFloat(8), "up")


def representable(t, wl=8):
    return torch.equal(quantize(t, BlockFloat(wl, 0)), t)


def test_an_8_bit_step_leaves_only_representable_values():
    torch.manual_seed(0)
    model = randomize_bn(create_model(ModelSpec("resnet", 18, 0.125))).train()
    lp = LowPrecision(8, 8, 8, 8, 8, "stochastic")
    x = torch.randn(4, 3, 32, 32)
    outputs, errors = {}, {}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    def catch_error(mod, inputs, out, name):
        if out.requires_grad:
            out.register_hook(lambda g: errors.__setitem__(name, g))

    for name, m in layers:  # before the quantizer: the gradient reaching the layer's own output
        m.register_forward_hook(lambda mod, i, out, name=name: catch_error(mod, i, out, name))
    precision = Precision(lp, model, torch.device("cpu"), 0, x[:2])
    for name, m in layers:  # after it: what the next layer reads
        m.register_forward_hook(lambda mod, i, out, name=name: outputs.__setitem__(name, out))  # returns None
    opt = precision.optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.zero_grad()
        model(x).logsumexp(1).mean().backward()
        opt.step()
    assert all(representable(p.detach()) for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(representable(s["momentum_buffer"]) for s in opt.state.values())
    # conv outputs and the errors flowing into them are 8-bit; the logits are not
    for name in outputs:
        if name == "fc":
            assert not representable(outputs[name].detach()) and not representable(errors[name])
        else:
            assert representable(outputs[name].detach()) and representable(errors[name]), name


def test_swa_is_the_mean_of_the_weights_with_fresh_bn_statistics():
    torch.manual_seed(0)
    model = create_model(ModelSpec("vgg", 11, 0.125))
    swa = SWA(model)
    snapshots = []
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        swa.update(model)
        snapshots.append([p.detach().clone() for p in model.parameters()])
    for avg, *ps in zip(swa.model.parameters(), *snapshots):
        assert torch.allclose(avg, sum(ps) / 3, atol=1e-6)
    data = [(torch.randn(8, 3, 32, 32) * 2 + 1, None) for _ in range(3)]
    swa.recompute_bn(data)
    first_bn = swa.model.features[1]
    with torch.no_grad():
        conv_out = torch.cat([swa.model.features[0](x) for x, _ in data])
    assert torch.allclose(first_bn.running_mean, conv_out.mean((0, 2, 3)), atol=1e-4)
    assert not swa.model.training


def test_low_precision_run_end_to_end(capsys, tmp_path, fmnist_root):
    args = ["run", "--dataset", "fashion-mnist", "--data", fmnist_root, "--no-download", "--arch", "vgg11",
            "--width", "0.125", "--batch-size", "16", "--test-batch-size", "32", "--epochs", "6", "--schedule", "4",
            "--ratios", "0.5", "--eb-window", "2", "--eb-threshold", "0.9", "--latency-batches",
            "--wl-weight", "8", "--wl-grad", "8", "--wl-activate", "8", "--wl-error", "8", "--wl-momentum", "8",
            "--swa", "--swa-start", "4", "--save", tmp_path / "lp"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    summary = json.loads((tmp_path / "lp" / "summary.json").read_text())
    row = summary["ratios"][0]
    assert row["eb_epoch"] is not None and row["acc_retrained_swa"] is not None
    assert summary["number_formats"]["weight"].startswith("BFP8") and summary["arithmetic_cost_vs_fp32"] == 0.25
    assert "arithmetic cost" in out and "SWA" in out
    assert (tmp_path / "lp" / "retrain-50" / "swa.pth").exists()
    code, out, _ = cli(capsys, "eval", "--model", tmp_path / "lp" / "retrain-50" / "swa.pth", "--data", fmnist_root)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["top1"] == row["acc_retrained_swa"]
    code, _, err = cli(capsys, *args[:-1], tmp_path / "x", "--wl-weight", "1")
    assert code == 2 and "--wl-weight 1" in err
