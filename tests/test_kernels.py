"""The fused channels-last batch norm (+ ReLU) (+ 2x2 max-pool): values, gradients and running
statistics against torch's batch norm in float64, bf16 under autocast, the model switch, and the
fallbacks."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from earlybird import EarlyBird, accel, prune_model
from earlybird.accel import batch_norm as kernels
from earlybird.accel.batch_norm import FusedBatchNorm2d, FusedSelectBatchNorm2d, fuse_batch_norm, gather_channels
from earlybird.accel.conv import GemmConv2d
from earlybird.accel.speed import use_fused_batch_norm
from earlybird.config import RuntimeConfig
from earlybird.models import ModelSpec, create_model
from earlybird.models.layers import bn_relu
from earlybird.prune import prunable_layers
from earlybird.prune.layers import SelectBatchNorm2d

CL = torch.channels_last


@pytest.fixture(scope="module", autouse=True)
def compiled():
    assert kernels.load() is not None, kernels.failure()  # a machine with a C++ compiler must build it


ACTIVATIONS = {None: lambda y: y, "relu": F.relu, "relu6": F.relu6}


def _reference(x, bn, activation, dy):
    """torch's batch norm (+ activation) in float64 on a copy: output, input/weight/bias gradients, running stats."""
    ref = copy.deepcopy(bn).double()
    xr = x.detach().double().requires_grad_()
    y = ACTIVATIONS[activation](ref(xr))
    y.backward(dy.double())
    return y, xr.grad, ref.weight.grad, ref.bias.grad, ref.running_mean, ref.running_var


# widths off the vector width, a row count that leaves a partial block (3*5*5 = 75 rows), a large mean
@pytest.mark.parametrize("channels,shape", [(8, (3, 5, 5)), (24, (3, 5, 5)), (40, (2, 7, 3)), (64, (4, 4, 4))])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_matches_batch_norm_in_float64(channels, shape, activation):
    torch.manual_seed(channels)
    n, h, w = shape
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.2, 3.0)  # some outputs above 6: ReLU6 clips at both ends
        bn.bias.normal_(0, 0.5)
    x = (torch.randn(n, channels, h, w) * 3 + 20).contiguous(memory_format=CL)
    dy = torch.randn(n, channels, h, w).contiguous(memory_format=CL)
    y_ref, dx_ref, dw_ref, db_ref, rm_ref, rv_ref = _reference(x, bn, activation, dy)
    fused = copy.deepcopy(bn)
    fused.__class__, fused.activation = FusedBatchNorm2d, activation
    xf = x.clone().requires_grad_()
    y = fused(xf)
    assert y.is_contiguous(memory_format=CL)
    y.backward(dy)

    def close(a, b, tol):
        assert (a.double() - b).abs().max().item() <= tol * b.abs().max().item(), (a.double() - b).abs().max()

    close(y, y_ref, 1e-5)
    close(xf.grad, dx_ref, 1e-4)
    close(fused.weight.grad, dw_ref, 1e-4)
    close(fused.bias.grad, db_ref, 1e-4)
    close(fused.running_mean, rm_ref, 1e-6)
    close(fused.running_var, rv_ref, 1e-5)
    assert fused.num_batches_tracked.item() == 1
    if activation:
        assert (y >= 0).all() and (y == 0).any()
    if activation == "relu6":
        assert (y <= 6).all() and (y == 6).any()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_residual_add_and_relu(dtype, tol):
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(24)
    with torch.no_grad():
        bn.weight.uniform_(0.2, 1.5)
        bn.bias.normal_(0, 0.5)
    x = (torch.randn(3, 24, 5, 5) * 2 + 1).to(dtype).contiguous(memory_format=CL)
    r = torch.randn(3, 24, 5, 5).to(dtype).contiguous(memory_format=CL)
    dy = torch.randn(3, 24, 5, 5).to(dtype).contiguous(memory_format=CL)
    ref = copy.deepcopy(bn).double()
    xr, rr = (t.detach().double().requires_grad_() for t in (x, r))
    y_ref = F.relu(ref(xr) + rr)
    y_ref.backward(dy.double())
    fused = copy.deepcopy(bn)
    fused.__class__ = FusedBatchNorm2d
    xf, rf = (t.clone().requires_grad_() for t in (x, r))
    y = bn_relu(fused, xf, rf)
    y.backward(dy)
    assert y.dtype == dtype and xf.grad.dtype == dtype and rf.grad.dtype == dtype
    for got, want in ((y, y_ref), (xf.grad, xr.grad), (rf.grad, rr.grad), (fused.weight.grad, ref.weight.grad),
                      (fused.bias.grad, ref.bias.grad), (fused.running_var, ref.running_var)):
        assert (got.double() - want).abs().max() <= tol * want.abs().max()
    with pytest.raises(ValueError, match="only before a ReLU"):
        fused(x, r, None)


def test_bf16_under_autocast_matches_float32():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(24)
    fused = copy.deepcopy(bn)
    fused.__class__, fused.activation = FusedBatchNorm2d, "relu"
    x = torch.randn(4, 24, 6, 6).contiguous(memory_format=CL)
    dy = torch.randn_like(x)
    y_ref, dx_ref, dw_ref, *_ = _reference(x.bfloat16().float(), bn, "relu", dy.bfloat16().float())
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(xb)
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    assert xb.grad.dtype == torch.bfloat16 and fused.weight.grad.dtype == torch.float32
    assert (y.double() - y_ref).abs().max() <= 2e-2 * y_ref.abs().max()
    assert (xb.grad.double() - dx_ref).abs().max() <= 3e-2 * dx_ref.abs().max()
    assert (fused.weight.grad.double() - dw_ref).abs().max() <= 2e-2 * dw_ref.abs().max()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_evaluation_without_autograd_is_one_fused_pass(dtype, tol, monkeypatch):
    torch.manual_seed(4)
    bn = nn.BatchNorm2d(40)
    with torch.no_grad():
        bn.weight.uniform_(0.2, 1.5)
        bn.bias.normal_(0, 0.5)
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    fused = copy.deepcopy(bn)
    fused.__class__ = FusedBatchNorm2d
    x, r = (torch.randn(4, 40, 6, 6).to(dtype).contiguous(memory_format=CL) for _ in range(2))
    counter = _CountingKernel(kernels._extension)
    monkeypatch.setattr(kernels, "_extension", counter)
    with torch.inference_mode():
        for residual in (None, r):
            want = F.relu(bn(x).float() + (0 if residual is None else residual.float()))
            got = bn_relu(fused, x, residual)
            assert got.dtype == dtype and got.is_contiguous(memory_format=CL)
            assert (got.float() - want).abs().max() <= tol * want.abs().max()
        plain_got = fused(x)
        assert (plain_got.float() - bn(x).float()).abs().max() <= tol * bn(x).float().abs().max()
    assert counter.calls == {True: 2, False: 1}
    y = fused(x)  # under autograd: torch's kernel
    assert torch.equal(y, bn(x)) and counter.calls == {True: 2, False: 1}


def test_cumulative_average_without_momentum():
    bn = nn.BatchNorm2d(8, momentum=None)
    fused = copy.deepcopy(bn)
    fused.__class__ = FusedBatchNorm2d
    for seed in range(3):
        x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(seed)).contiguous(memory_format=CL)
        bn(x), fused(x)
    assert torch.allclose(fused.running_mean, bn.running_mean, atol=1e-6)
    assert torch.allclose(fused.running_var, bn.running_var, atol=1e-6)


def _pooled(bn, activation):
    """Two fused copies of ``bn``: one followed by torch's 2x2 max-pool, one with the pool fused."""
    apart = copy.deepcopy(bn)
    apart.__class__, apart.activation = FusedBatchNorm2d, activation
    fused = copy.deepcopy(apart)
    fused.pool = True
    return (lambda x: F.max_pool2d(apart(x), 2)), fused, apart


# odd sizes leave a last row / column out of every window. Ties: integer inputs tie within windows
# (torch's pool takes the first largest); "rounded": a small scale and a large offset make bf16 round
# distinct values to ties, which torch's pool sees in the stored activation
@pytest.mark.parametrize("shape", [(3, 6, 8), (2, 7, 5), (1, 3, 2)])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("data", ["random", "integers", "rounded"])
def test_fused_pool_is_batch_norm_then_torch_max_pool(shape, activation, dtype, data):
    torch.manual_seed(len(shape) + shape[1])
    n, h, w = shape
    bn = nn.BatchNorm2d(24)
    with torch.no_grad():
        bn.weight.uniform_(0.2, 3.0)
        bn.bias.normal_(0, 1.0)
        if data == "rounded":
            bn.weight.fill_(0.05)
            bn.bias.fill_(4.0)
    x = torch.randint(-2, 3, (n, 24, h, w)).float() if data == "integers" else torch.randn(n, 24, h, w) * 3 + 1
    x = x.to(dtype).contiguous(memory_format=CL)
    separate, fused, apart = _pooled(bn, activation)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = separate(xa), fused(xb)
    assert got.shape == (n, 24, h // 2, w // 2) and got.dtype == dtype and got.is_contiguous(memory_format=CL)
    assert torch.equal(got, want)
    dy = torch.randn_like(want)
    want.backward(dy), got.backward(dy)
    # the same elements get the gradient: the results differ only by the order of the channel sums
    # (and in bf16 by the rounding of that), within an ulp of each element
    a, b = xa.grad.float(), xb.grad.float()
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-6
    assert ((b - a).abs() <= ulp * a.abs() + 1e-5 * a.abs().max()).all()
    for a, b in ((apart.weight.grad, fused.weight.grad), (apart.bias.grad, fused.bias.grad),
                 (apart.running_mean, fused.running_mean), (apart.running_var, fused.running_var)):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max() + 1e-7
    apart.eval(), fused.eval()
    with torch.inference_mode():
        assert torch.equal(fused(x), separate(x))


def test_fused_pool_matches_torch_in_float64():
    torch.manual_seed(5)
    bn = nn.BatchNorm2d(40)
    with torch.no_grad():
        bn.weight.uniform_(0.2, 3.0)
        bn.bias.normal_(0, 0.5)
    x = (torch.randn(4, 40, 8, 6) * 2 + 5).contiguous(memory_format=CL)
    dy = torch.randn(4, 40, 4, 3).contiguous(memory_format=CL)
    ref = copy.deepcopy(bn).double()
    xr = x.double().requires_grad_()
    y_ref = F.max_pool2d(F.relu(ref(xr)), 2)
    y_ref.backward(dy.double())
    _, fused, _ = _pooled(bn, "relu")
    xf = x.clone().requires_grad_()
    y = fused(xf)
    y.backward(dy)
    for got, want, tol in ((y, y_ref, 1e-5), (xf.grad, xr.grad, 1e-4), (fused.weight.grad, ref.weight.grad, 1e-4),
                           (fused.running_var, ref.running_var, 1e-5)):
        assert (got.double() - want).abs().max() <= tol * want.abs().max()


def test_only_a_plain_2x2_max_pool_after_the_batch_norm_folds():
    model = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),  # folds: BN, ReLU, pool
                          nn.BatchNorm2d(8), nn.MaxPool2d(2, 2),  # folds: no activation between
                          nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2),  # not 2x2
                          nn.BatchNorm2d(8), nn.MaxPool2d(2, ceil_mode=True),  # not floor mode
                          nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2, padding=1),  # padded
                          nn.BatchNorm2d(8), nn.AvgPool2d(2))
    reference = copy.deepcopy(model)
    assert fuse_batch_norm(model) == 6
    assert [type(m).__name__ for m in model] == [
        "FusedBatchNorm2d", "Identity", "Identity", "FusedBatchNorm2d", "Identity",
        "FusedBatchNorm2d", "Identity", "MaxPool2d", "FusedBatchNorm2d", "MaxPool2d",
        "FusedBatchNorm2d", "Identity", "MaxPool2d", "FusedBatchNorm2d", "AvgPool2d"]
    assert [m.pool for m in model if isinstance(m, FusedBatchNorm2d)] == [True, True, False, False, False, False]
    assert "pool=max 2x2" in repr(model[0])
    x = torch.randn(2, 8, 64, 64).contiguous(memory_format=CL)
    assert (model(x) - reference(x)).abs().max() <= 1e-4
    kept = copy.deepcopy(reference)
    fuse_batch_norm(kept, pools=False)
    assert sum(isinstance(m, nn.MaxPool2d) for m in kept) == 5 and not any(
        m.pool for m in kept if isinstance(m, FusedBatchNorm2d))


def test_fused_pool_outside_the_kernel_is_torch_exactly():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(16)
    separate, fused, apart = _pooled(bn, "relu")
    x = torch.randn(4, 16, 6, 6)  # contiguous: torch's kernels, the pool applied after them
    assert torch.equal(fused(x), separate(x))
    apart.eval(), fused.eval()
    assert torch.equal(fused(x), separate(x))  # eval mode under autograd
    with pytest.raises(ValueError, match="without a pool"):
        fused(x.contiguous(memory_format=CL), x.contiguous(memory_format=CL), "relu")


def test_pooled_kernel_refuses_bad_calls():
    ext = kernels._extension
    w, b = torch.ones(8), torch.zeros(8)
    tiny = torch.randn(2, 8, 1, 4).contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="at least 2x2"):
        ext.forward(tiny, None, w, b, 1e-5, 1, True)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="no pool"):
        ext.forward(x, x.clone(), w, b, 1e-5, 1, True)
    _, stats, codes = ext.forward(x, None, w, b, 1e-5, 1, True)
    pooled_grad = torch.randn(2, 8, 2, 2).contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="pooled output's shape"):
        ext.backward(torch.randn_like(x), x, None, w, b, stats, 1, True, codes)
    with pytest.raises(RuntimeError, match="pooled forward's codes"):
        ext.backward(pooled_grad, x, None, w, b, stats, 1, True, codes[:-1])
    assert ext.backward(pooled_grad, x, None, w, b, stats, 1, True, codes)[0].shape == x.shape


def _vgg():
    torch.manual_seed(0)
    return create_model(ModelSpec("vgg", 11, 0.125, 1, 10, 16))


class _CountingKernel:
    """The compiled kernel, counting the forward calls with and without a fused activation, and
    those with a fused pool."""

    def __init__(self, kernel):
        self.kernel, self.calls, self.pools = kernel, {True: 0, False: 0}, 0

    def forward(self, x, residual, weight, bias, eps, activation, pool):
        self.calls[activation != 0] += 1
        self.pools += pool
        return self.kernel.forward(x, residual, weight, bias, eps, activation, pool)

    def backward(self, *args):
        return self.kernel.backward(*args)

    def affine(self, x, residual, scale, offset, activation, pool):
        self.calls[activation != 0] += 1
        self.pools += pool
        return self.kernel.affine(x, residual, scale, offset, activation, pool)

    def __getattr__(self, name):  # gather, scatter
        return getattr(self.kernel, name)


# VGG, MobileNetV2: ReLU / ReLU6 modules after BNs in a Sequential (VGG11's 2x2 max-pools after four
# of them); ResNet, PreResNet, DenseNet: bn_relu in the model code. MobileNetV2 this small trains
# chaotically (torch's own float32 drifts O(1) from float64 within 3 steps), so it is compared on one
# step's gradients, with its BN biases at 3: after 17 blocks float32 has drifted ~1e-5 from float64,
# enough to flip a ReLU6 mask where an input sits at a kink, and with zero biases torch's own float32
# gradients missed float64's by up to 14% on 4 of 6 seeds on an AVX2 CPU (one flip each); centred
# between the kinks, torch's and the fused gradients stayed under 0.2 of the tolerance on all 6.
@pytest.mark.parametrize("spec,relus,plain_only,pools,steps", [
    (ModelSpec("vgg", 11, 0.125, 1, 10, 16), 8, 0, 4, 3),
    (ModelSpec("resnet", 18, 0.25, 1, 10, 16), 17, 3, 0, 3),  # the stem, each block's bn1 and bn2 (+ residual); shortcuts
    (ModelSpec("preresnet", 11, 1.0, 1, 10, 16), 10, 0, 0, 3),
    (ModelSpec("densenet", 10, 0.5, 1, 10, 16), 9, 0, 0, 3),
    (ModelSpec("mobilenetv2", 0, 0.25, 1, 10, 16), 35, 17, 0, 1),  # ReLU6 after all but the projections
])
def test_fused_model_trains_like_the_plain_one(spec, relus, plain_only, pools, steps, monkeypatch):
    torch.manual_seed(0)
    plain = create_model(spec).to(memory_format=CL)
    if spec.arch == "mobilenetv2":
        with torch.no_grad():
            for m in plain.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.bias.fill_(3.0)
    fused = copy.deepcopy(plain)
    keys = fused.state_dict().keys()
    n_bn = sum(type(m) is nn.BatchNorm2d for m in plain.modules())
    assert fuse_batch_norm(fused) == n_bn
    assert fused.state_dict().keys() == keys
    if spec.arch in ("vgg", "mobilenetv2"):  # each ReLU / ReLU6 module folded into its batch norm
        assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in fused.modules())
        assert {m.activation for m in fused.modules() if isinstance(m, FusedBatchNorm2d)} == (
            {"relu"} if spec.arch == "vgg" else {"relu6", None})
    assert sum(isinstance(m, nn.MaxPool2d) for m in fused.modules()) == sum(
        isinstance(m, nn.MaxPool2d) for m in plain.modules()) - pools
    counter = _CountingKernel(kernels._extension)
    monkeypatch.setattr(kernels, "_extension", counter)
    copy.deepcopy(fused)(torch.randn(2, 1, 16, 16).contiguous(memory_format=CL))  # a copy: stats stay as they are
    assert counter.calls == {True: relus, False: plain_only} and counter.pools == pools
    _trains_like_float64(plain, fused, steps, spec.in_channels)


def _trains_like_float64(plain, fused, steps, in_channels):
    """``fused`` (a fused copy of ``plain``) trains ``steps`` SGD steps as ``plain`` does in float64.

    Against torch's batch norm in float64: torch's own float32 channels-last path rounds its batch
    statistics coarsely enough (5e-5) to flip ReLU masks, so it drifted 3% from float64 in 3 steps."""
    reference = copy.deepcopy(plain).double()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (reference, fused)]
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, in_channels, 16, 16, generator=g).contiguous(memory_format=CL)
        y = torch.randint(0, 10, (8,), generator=g)
        for model, opt in zip((reference, fused), opts):
            opt.zero_grad()
            F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y).backward()
            opt.step()
    # gradients (some are exactly zero in float64: a bias before a batch norm) on the model's scale
    scale = max(p.grad.abs().max() for p in reference.parameters())
    for (name, a), b in zip(reference.named_parameters(), fused.parameters()):
        assert (b.grad.double() - a.grad).abs().max() <= 1e-4 * a.grad.abs().max() + 1e-6 * scale, name
    for (name, a), b in zip(reference.state_dict().items(), fused.state_dict().values()):
        if a.dtype.is_floating_point:
            assert (b.double() - a).abs().max() <= 1e-4 * a.abs().max() + 1e-7, name
    fused.load_state_dict(plain.state_dict())
    plain.eval(), fused.eval()
    x = torch.randn(4, in_channels, 16, 16).contiguous(memory_format=CL)
    assert torch.equal(plain(x), fused(x))  # eval mode under autograd: torch's kernel, the same numbers


def test_pruned_preresnet_with_select_bns_trains_like_the_plain_one(monkeypatch):
    """Its select BNs read kept streams: gathered on the kernel, then the fused batch norm and ReLU."""
    torch.manual_seed(0)
    dense = create_model(ModelSpec("preresnet", 11, 1.0, 1, 10, 16))
    with torch.no_grad():
        for m in dense.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.1, 1.0)
    example = torch.randn(2, 1, 16, 16)
    detector = EarlyBird(dense, [0.5], layers=prunable_layers(dense, example))
    detector.step()
    plain = prune_model(dense, detector.layer_masks(0.5, detector.mask(0.5)), example)[0].to(memory_format=CL)
    selects = sum(type(m) is SelectBatchNorm2d for m in plain.modules())
    assert selects > 0
    fused = copy.deepcopy(plain)
    assert fuse_batch_norm(fused) == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(type(m) is FusedSelectBatchNorm2d for m in fused.modules()) == selects
    counter = _CountingKernel(kernels._extension)
    monkeypatch.setattr(kernels, "_extension", counter)
    copy.deepcopy(fused)(torch.randn(2, 1, 16, 16).contiguous(memory_format=CL))
    assert counter.calls[True] == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())  # every BN + ReLU
    _trains_like_float64(plain, fused, 3, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_gather_keeps_channels_last_and_scatters_its_gradient(dtype, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(kernels, "_extension", None)
    torch.manual_seed(0)
    x = torch.randn(3, 40, 5, 7).to(dtype).contiguous(memory_format=CL).requires_grad_()
    index = torch.tensor([0, 3, 4, 5, 17, 30, 39])
    y = gather_channels(x, index)
    assert y.is_contiguous(memory_format=CL) and torch.equal(y, x.detach().index_select(1, index))
    g = torch.randn_like(y)
    y.backward(g)
    want = torch.zeros_like(x)
    want[:, index] = g
    assert torch.equal(x.grad, want)
    flat = torch.randn(3, 40, 5, 7)  # a contiguous input stays torch's index_select
    assert torch.equal(gather_channels(flat, index), flat.index_select(1, index))
    if kernel:
        with pytest.raises(RuntimeError, match="index must be .* channels of the input"):
            kernels._extension.gather(x.detach(), torch.tensor([40]))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_select_matches_select_in_float64(training):
    torch.manual_seed(5)
    select = SelectBatchNorm2d(24)
    select.index, select.in_channels = torch.tensor(sorted(torch.randperm(40)[:24].tolist())), 40
    with torch.no_grad():
        select.weight.uniform_(0.2, 2.0)
        select.bias.normal_(0, 0.5)
        select.running_var.uniform_(0.5, 2)
    model = nn.Sequential(copy.deepcopy(select), nn.ReLU())
    assert fuse_batch_norm(model) == 1 and type(model[0]) is FusedSelectBatchNorm2d and model[0].activation == "relu"
    fused = model[0].train(training)
    reference = copy.deepcopy(select).double().train(training)
    x = (torch.randn(3, 40, 5, 5) * 3 + 2).contiguous(memory_format=CL)
    if not training:
        with torch.inference_mode():
            got, want = fused(x), F.relu(reference(x.double()))
        assert got.is_contiguous(memory_format=CL) and (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
        return
    dy = torch.randn(3, 24, 5, 5)
    xr, xf = x.double().requires_grad_(), x.clone().requires_grad_()
    want = F.relu(reference(xr))
    want.backward(dy.double())
    got = fused(xf)
    got.backward(dy)
    for a, b in ((got, want), (xf.grad, xr.grad), (fused.weight.grad, reference.weight.grad),
                 (fused.bias.grad, reference.bias.grad), (fused.running_var, reference.running_var)):
        assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max()
    assert (xf.grad[:, [c for c in range(40) if c not in select.index.tolist()]] == 0).all()


def test_contiguous_input_uses_torch_kernel_exactly():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 24, 3), nn.BatchNorm2d(24), nn.ReLU(inplace=True), nn.Conv2d(24, 8, 3))
    fused = copy.deepcopy(plain)
    fuse_batch_norm(fused)
    x = torch.randn(4, 3, 10, 10)
    assert torch.equal(plain(x), fused(x))
    assert torch.equal(plain[1].running_var, fused[1].running_var)


class _Reversed(nn.Sequential):
    def forward(self, x):
        for m in reversed(self):
            x = m(x)
        return x


def test_subclasses_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SyncBatchNorm(8), nn.ReLU(), nn.BatchNorm2d(8), nn.ReLU(),
                          _Reversed(nn.ReLU(), nn.BatchNorm2d(8), nn.ReLU()))
    assert fuse_batch_norm(model) == 2
    assert type(model[1]) is nn.SyncBatchNorm and isinstance(model[2], nn.ReLU)
    assert type(model[3]) is FusedBatchNorm2d and isinstance(model[4], nn.Identity)
    # a Sequential with its own forward: its ReLUs stay where they are
    assert type(model[5][1]) is FusedBatchNorm2d and model[5][1].activation is None
    assert isinstance(model[5][2], nn.ReLU)


def test_unfused_where_the_flag_or_device_says_so(monkeypatch):
    model = _vgg()
    assert use_fused_batch_norm(model, RuntimeConfig(cpu_kernels="off"), torch.device("cpu")) == 0
    assert use_fused_batch_norm(model, RuntimeConfig(compile=True), torch.device("cpu")) == 0
    assert use_fused_batch_norm(model, RuntimeConfig(), torch.device("meta")) == 0
    assert not any(isinstance(m, FusedBatchNorm2d) for m in model.modules())


def test_no_compiler_falls_back_with_one_line(monkeypatch):
    monkeypatch.setattr(kernels, "_extension", None)
    monkeypatch.setattr(kernels, "_failure", "RuntimeError: Ninja is required to load C++ extensions")
    lines = []

    class Reporter:
        line = staticmethod(lines.append)

    model = _vgg()
    assert use_fused_batch_norm(model, RuntimeConfig(), torch.device("cpu"), Reporter()) == 0
    assert len(lines) == 1 and "Ninja is required" in lines[0] and "--cpu-kernels off" in lines[0]
    assert not any(isinstance(m, FusedBatchNorm2d) for m in model.modules())


def test_needs_build_follows_the_cache(monkeypatch, tmp_path):
    assert not kernels.needs_build()  # loaded (built or found) by the fixture
    monkeypatch.setattr(kernels, "_extension", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert kernels.needs_build()


def test_ninja_of_the_environment_is_found(monkeypatch):
    import ninja

    monkeypatch.setenv("PATH", "/nonexistent")  # as under venv/bin/python without activation
    kernels._put_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    kernels._put_ninja_on_path()  # once only
    assert os.environ["PATH"].count(ninja.BIN_DIR) == 1


def test_prepare_then_restore_gives_the_plain_model_back(monkeypatch):
    from earlybird.accel import speed

    # every convolution's parts win as GEMM, so both kinds of module swap happen
    monkeypatch.setattr(speed, "gemm_convolutions", lambda model, shape, batch, device, dtype: {
        name: accel.tuning.ConvChoice((True, True, True), 2.0, 1.0) for name, m in model.named_modules()
        if accel.conv.gemm_eligible(m)})
    plain, x = _vgg(), torch.randn(2, 1, 16, 16)
    model = copy.deepcopy(plain)
    params = [id(p) for p in model.parameters()]
    lines = []
    model, setting = accel.prepare(model, (1, 16, 16), 10, 4, torch.device("cpu"), RuntimeConfig(channels_last="on",
                                   amp="off"), type("R", (), {"line": staticmethod(lines.append)})())
    assert setting.channels_last and setting.amp_dtype is None
    assert any(isinstance(m, FusedBatchNorm2d) for m in model.modules())
    assert any(isinstance(m, GemmConv2d) for m in model.modules())
    assert setting.state_dict(model)["gemm"]  # the checkpoint's entry names the GEMM layers
    accel.restore(model, setting)
    assert repr(model) == repr(plain)  # torch's modules, ReLUs and pools back where they were
    assert [id(p) for p in model.parameters()] == params  # an optimizer built before stays valid
    assert not any("activation" in vars(m) or "pool" in vars(m) for m in model.modules())
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5)
