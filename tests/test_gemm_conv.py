"""Convolutions as im2col + GEMM (kernels.conv) and the per-layer timing that chooses them."""
import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from earlybird import ModelSpec, create_model
from earlybird.config import RuntimeConfig
from earlybird.accel import conv as gemm
from earlybird.accel.conv import GemmConv2d, gemm_eligible, keep_gemm, to_gemm
from earlybird.accel import speed
from earlybird.accel.speed import choose_gemm, report_gemm
from earlybird.accel import tuning
from earlybird.train import distributed, load_checkpoint
from earlybird.accel.tuning import ConvChoice, gemm_convolutions, gemm_layers, restore_gemm, use_gemm

from test_cli import TINY, cli, interrupt_epoch

CL = torch.channels_last
ALL = (True, True, True)
# (in, out, kernel, padding, dilation, bias, image size): 'same' and 'valid' padding, larger and
# non-square kernels, dilation, a 1x1 and a non-square image
SHAPES = [(3, 5, 3, 1, 1, True, 7), (4, 6, 3, 0, 1, False, 6), (5, 3, 5, 2, 1, True, 9), (4, 4, 3, 2, 2, True, 8),
          (3, 2, (3, 1), (1, 0), 1, False, 5), (2, 3, 3, 1, 1, False, 1), (3, 4, 3, 1, 1, True, (5, 8))]


def _pair(cin, cout, k, p, d, bias, dtype=torch.float64):
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, k, padding=p, dilation=d, bias=bias).to(dtype).to(memory_format=CL)
    ours = copy.deepcopy(ref)
    return ref, ours


def _grads(conv, x, grad):
    x = x.clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    y = conv(x)
    y.backward(grad)
    return y, x.grad, conv.weight.grad, None if conv.bias is None else conv.bias.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_every_part_combination_equals_torch_in_float64(shape):
    *conv_args, size = shape
    ref, ours = _pair(*conv_args)
    h, w = size if isinstance(size, tuple) else (size, size)
    x = torch.randn(3, ref.in_channels, h, w, dtype=torch.float64).contiguous(memory_format=CL)
    grad = torch.randn_like(ref(x))
    expected = _grads(ref, x, grad)
    for parts in itertools.product([False, True], repeat=3):
        if not any(parts):
            continue
        to_gemm(ours, torch.float64, parts)
        got = _grads(ours, x, grad)
        assert got[0].is_contiguous(memory_format=CL)  # the next layer sees channels-last, as from torch
        for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), expected, got):
            if a is None:
                assert b is None
                continue
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-12), (parts, name)


def test_gemm_really_runs_and_only_where_it_may(monkeypatch):
    calls = []
    real = gemm._forward
    monkeypatch.setattr(gemm, "_forward", lambda *a: calls.append(a[0].shape) or real(*a))
    ref, ours = _pair(4, 8, 3, 1, 1, True, torch.float32)
    to_gemm(ours, torch.float32, (True, False, False))
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(ours(x), ref(x)) and not calls  # a contiguous input: torch's convolution
    x = x.contiguous(memory_format=CL)
    assert torch.allclose(ours(x), ref(x), atol=1e-5) and calls == [x.shape]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # no choice for bf16: torch's
        assert ours(x).dtype == torch.bfloat16 and len(calls) == 1
    with torch.no_grad():  # evaluation: the GEMM forward without autograd
        assert torch.allclose(ours(x), ref(x), atol=1e-5) and len(calls) == 2
    to_gemm(ours, torch.float32, (False, True, True))
    with torch.no_grad():  # no GEMM forward chosen: torch's, autograd's parts unused
        assert torch.equal(ours(x), ref(x)) and len(calls) == 2


def test_bf16_autocast_matches_torch_and_leaves_fp32_parameters():
    ref, ours = _pair(16, 32, 3, 1, 1, True, torch.float32)
    to_gemm(ours, torch.bfloat16)
    x = torch.randn(8, 16, 4, 4).contiguous(memory_format=CL)
    grad = torch.randn(8, 32, 4, 4).to(torch.bfloat16).contiguous(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _grads(ref, x, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(ours, x, grad)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == got[3].dtype == torch.float32
    for a, b in zip(expected, got):
        scale = a.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= 2e-2 * scale  # bf16 rounding of two summation orders


def test_eligibility_and_bad_calls():
    assert gemm_eligible(nn.Conv2d(4, 4, 3, padding=1))
    assert not gemm_eligible(nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert not gemm_eligible(nn.Conv2d(4, 4, 3, padding=1, groups=2))
    assert not gemm_eligible(nn.Conv2d(4, 4, 1))  # already one matrix product
    assert not gemm_eligible(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert not gemm_eligible(nn.Conv2d(4, 4, 3, padding=3))  # padding beyond the kernel's reach
    assert not gemm_eligible(nn.Conv2d(4, 4, 3, padding="same"))
    assert not gemm_eligible(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="stride-1"):
        to_gemm(nn.Conv2d(4, 4, 3, stride=2), torch.float32)
    with pytest.raises(ValueError, match="at least one"):
        to_gemm(nn.Conv2d(4, 4, 3), torch.float32, (False, False, False))


def test_switching_keeps_parameters_state_and_choices_per_type():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    weight, keys = model[0].weight, list(model.state_dict())
    to_gemm(model[0], torch.float32, (True, False, True))
    to_gemm(model[0], torch.bfloat16, (False, False, True))
    to_gemm(model[2], torch.bfloat16)
    assert model[0].weight is weight and list(model.state_dict()) == keys  # optimizers and checkpoints unaffected
    assert model[0].gemm == {torch.float32: (True, False, True), torch.bfloat16: (False, False, True)}
    assert "float32: forward+weight gradient" in repr(model[0])
    assert gemm_layers(model, None) == {"0": [True, False, True]}
    assert keep_gemm(model, torch.float32) == 1  # the bf16-only layer is torch's again
    assert type(model[0]) is GemmConv2d and model[0].gemm == {torch.float32: (True, False, True)}
    assert type(model[2]) is nn.Conv2d and not hasattr(model[2], "gemm")
    assert keep_gemm(model, None) == 0 and type(model[0]) is nn.Conv2d
    assert restore_gemm(model, {"0": [False, True, False], "1": [True, True, True], "gone": [True] * 3}, None) == 1
    assert model[0].gemm == {torch.float32: (False, True, False)}  # the BN and the unknown name are skipped


def test_a_gemm_network_trains_like_torchs():
    torch.manual_seed(0)
    ref = create_model(ModelSpec("vgg", 11, 0.125, 3, 10, 32)).double().to(memory_format=CL)
    ours = copy.deepcopy(ref)
    for m in ours.modules():
        if gemm_eligible(m):
            to_gemm(m, torch.float64)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=CL)
    y = torch.tensor([0, 1, 2, 3])
    for model in (ref, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), name
    with torch.inference_mode():
        assert torch.allclose(ref.eval()(x), ours.eval()(x), atol=1e-9)


def _fake_timings(monkeypatch, gemm_wins, whole_layer_gemm=0.025):
    """Per layer input width: which parts GEMM computes in half of torch's time (the others 2x);
    a layer with such parts then takes 30 ms with torch's convolution, ``whole_layer_gemm`` s with
    them."""
    timed = []

    def medians(runs, repeats):  # called right after part_runs, for the shape it recorded
        if len(runs) == 2:  # then the whole layer, both ways, where a part won
            return [0.030, whole_layer_gemm]
        parts = gemm_wins[timed[-1]]
        return [t for win in parts for t in ((0.010, 0.005) if win else (0.010, 0.020))]

    real = gemm.part_runs

    def part_runs(x, weight, grad, padding, dilation):
        timed.append(x.shape[1])
        return real(x, weight, grad, padding, dilation)

    monkeypatch.setattr(tuning, "_medians", medians)
    monkeypatch.setattr(gemm, "part_runs", part_runs)
    return timed


def test_each_part_goes_where_it_was_faster_and_shapes_are_timed_once(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.Conv2d(16, 16, 1))
    timed = _fake_timings(monkeypatch, {3: (True, False, False), 8: (False, False, False)})
    choices = gemm_convolutions(model, (3, 8, 8), 4, "cpu", None)
    assert timed == [3, 8]  # layers 2 and 3 share a shape; the strided and the 1x1 ones are not eligible
    assert choices == {"0": ConvChoice((True, False, False), 30.0, 25.0)}  # layer 2/3: GEMM never faster
    use_gemm(model, choices, torch.bfloat16)
    assert model[0].gemm == {torch.bfloat16: (True, False, False)} and type(model[2]) is nn.Conv2d
    assert gemm_convolutions(model, (3, 8, 8), 4, "cuda", None) == {}  # a oneDNN matter: CPUs only
    # patch matrices over the memory bound: untimed. Layer 0's is 4 x 3*8*8 x 9 fp32 values (27,648 bytes)
    timed.clear()
    assert gemm_convolutions(model, (3, 8, 8), 4, "cpu", None, max_patch_bytes=27_647) == {} and timed == []
    assert list(gemm_convolutions(model, (3, 8, 8), 4, "cpu", None, max_patch_bytes=27_648)) == ["0"]


def test_parts_that_win_alone_but_lose_in_the_whole_layer_stay_torchs(monkeypatch):
    # the module, its casts and autograd cost more than GEMM saves: 29 ms is not under 0.9 x 30
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    _fake_timings(monkeypatch, {3: ALL}, whole_layer_gemm=0.029)
    assert gemm_convolutions(model, (3, 8, 8), 4, "cpu", None) == {}
    _fake_timings(monkeypatch, {3: ALL}, whole_layer_gemm=0.026)
    assert gemm_convolutions(model, (3, 8, 8), 4, "cpu", None) == {"0": ConvChoice(ALL, 30.0, 26.0)}


def test_a_worker_other_than_the_first_takes_the_first_ones_choice(monkeypatch):
    # one process stands for a worker whose rank is not 0: the sum over workers is its own zeros
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    _fake_timings(monkeypatch, {3: ALL})
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert gemm_convolutions(model, (3, 8, 8), 4, "cpu", None) == {}


def test_choose_gemm_follows_the_flags_and_the_settings(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    _fake_timings(monkeypatch, {3: (False, False, True)})
    cpu = torch.device("cpu")
    for rt in (RuntimeConfig(cpu_kernels="off"), RuntimeConfig(compile=True), RuntimeConfig(deterministic=True)):
        assert choose_gemm(model, rt, (3, 8, 8), 4, cpu, [(True, None)]) == {}
    assert choose_gemm(model, RuntimeConfig(), (3, 8, 8), 4, torch.device("meta"), [(True, None)]) == {}
    assert choose_gemm(model, RuntimeConfig(), (3, 8, 8), 4, cpu, [(False, None)]) == {}  # contiguous: no GEMM
    found = choose_gemm(model, RuntimeConfig(), (3, 8, 8), 4, cpu, [(False, None), (True, None), (True, torch.bfloat16)])
    assert list(found) == [None, torch.bfloat16]  # both channels-last precisions, so that timing them sees GEMM
    assert model[0].gemm == {torch.float32: (False, False, True), torch.bfloat16: (False, False, True)}
    lines = []

    class Reporter:
        line = staticmethod(lines.append)

    report_gemm((True, torch.bfloat16), found, 4, Reporter())
    assert lines == ["convolutions: 1 layers partly as im2col + GEMM (forward 0, input gradient 0, weight gradient "
                     "1), faster at their shapes than torch's: 30 -> 25 ms per step of 4 (--cpu-kernels off: torch's)"]
    report_gemm((False, None), found, 4, Reporter())  # training contiguous: nothing to say
    assert len(lines) == 1


def test_the_setting_keeps_its_own_gemm_layers(monkeypatch):
    _fake_timings(monkeypatch, {3: (False, False, True)})
    cpu = torch.device("cpu")
    settings = [(True, None), (True, torch.bfloat16)]
    picked = {}

    def fastest(model, input_shape, num_classes, batch_size, device, settings):
        # both precisions' GEMM layers are in place while the settings are timed
        picked["gemm"] = dict(model[0].gemm)
        return picked["best"], {s: 0.1 for s in settings}

    monkeypatch.setattr(speed, "fastest_setting", fastest)
    for best, kept in [((True, torch.bfloat16), {torch.bfloat16: (False, False, True)}),
                       ((True, None), {torch.float32: (False, False, True)})]:
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
        picked["best"] = best
        got, timings, found = speed.fastest_with_gemm(model, RuntimeConfig(), (3, 8, 8), 10, 4, cpu, settings)
        assert got == best and list(timings) == settings and list(found) == [None, torch.bfloat16]
        assert picked["gemm"] == {torch.float32: (False, False, True), torch.bfloat16: (False, False, True)}
        assert model[0].gemm == kept
    picked["best"] = (False, None)  # training contiguous: every layer is torch's again
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    speed.fastest_with_gemm(model, RuntimeConfig(), (3, 8, 8), 10, 4, cpu, [(False, None), *settings])
    assert type(model[0]) is nn.Conv2d
    # one setting: untimed
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    assert speed.fastest_with_gemm(model, RuntimeConfig(), (3, 8, 8), 10, 4, cpu, [(True, None)])[:2] == (
        (True, None), {})


def _search(capsys, root, save, *extra):
    return cli(capsys, "search", "--dataset", "cifar10", "--data", root, "--no-download", *TINY, "--epochs", 3,
               "--schedule", 2, "--ratios", 0.5, "--full", "--channels-last", "on", "--amp", "off", "--cpu-kernels", "on",
               "--save", save, *extra)


def test_the_cli_chooses_saves_and_restores_gemm_layers(capsys, tmp_path, cifar10_root, monkeypatch):
    # GEMM wins every part of every layer that has 16 input channels, loses elsewhere
    widths = []

    def medians(runs, repeats):
        if len(runs) == 2:  # the whole layer
            return [0.030, 0.015]
        return [t for _ in range(3) for t in ((0.010, 0.005) if widths[-1] == 16 else (0.010, 0.020))]

    monkeypatch.setattr(tuning, "_medians", medians)
    real_runs = gemm.part_runs
    monkeypatch.setattr(gemm, "part_runs", lambda x, *a: widths.append(x.shape[1]) or real_runs(x, *a))
    interrupt_epoch(monkeypatch, 2)
    save = tmp_path / "s"
    code, out, err = _search(capsys, cifar10_root, save)
    assert code == 130, err
    assert "convolutions: 2 layers partly as im2col + GEMM (forward 2, input gradient 2, weight gradient 2)" in out
    speed = load_checkpoint(save / "checkpoint.pth")["speed"]
    assert speed["gemm"] == {"features.11": [True] * 3, "features.15": [True] * 3}  # the two reading 16 channels
    # the same command continues the run with the layers it started with, untimed
    widths.clear()
    code, out, err = _search(capsys, cifar10_root, save)
    assert code == 0, err
    assert "convolutions: 2 layers partly as im2col + GEMM, as the run started" in out and widths == []
    assert load_checkpoint(save / "checkpoint.pth")["speed"]["gemm"] == speed["gemm"]
    code, out, err = _search(capsys, cifar10_root, tmp_path / "off", "--cpu-kernels", "off")
    assert code == 0, err
    assert "convolutions:" not in out and load_checkpoint(tmp_path / "off" / "checkpoint.pth")["speed"]["gemm"] == {}
    assert json.loads((save / "summary.json").read_text())["epochs_trained"] == 3


def test_real_timing_leaves_the_model_and_the_random_stream_alone():
    model = create_model(ModelSpec("vgg", 11, 0.125, 3, 10, 32)).train()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    choices = gemm_convolutions(model, (3, 32, 32), 8, "cpu", torch.bfloat16, repeats=1)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics included
    assert all(type(m) is not GemmConv2d for m in model.modules())  # timing only: use_gemm switches
    eligible = {name for name, m in model.named_modules() if gemm_eligible(m)}
    assert set(choices) <= eligible and all(0 < c.chosen_ms < c.torch_ms and any(c.gemm) for c in choices.values())


def test_a_network_timed_on_this_machine_before_starts_with_that_choice_untimed(capsys, tmp_path, cifar10_root,
                                                                             monkeypatch):
    from earlybird.accel import cache

    widths, timed = [], []

    def medians(runs, repeats):  # GEMM wins every part of the layers reading 16 channels
        if len(runs) == 2:
            return [0.030, 0.015]
        return [t for _ in range(3) for t in ((0.010, 0.005) if widths[-1] == 16 else (0.010, 0.020))]

    def fastest(model, input_shape, num_classes, batch_size, device, settings):
        timed.append(batch_size)
        return (True, torch.bfloat16), {s: 0.1 for s in settings}

    monkeypatch.setattr(tuning, "_medians", medians)
    real_runs = gemm.part_runs
    monkeypatch.setattr(gemm, "part_runs", lambda x, *a: widths.append(x.shape[1]) or real_runs(x, *a))
    monkeypatch.setattr(speed, "fastest_setting", fastest)

    def search(save, *extra):
        code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY,
                             "--epochs", 1, "--ratios", 0.5, "--cpu-kernels", "on", "--save", tmp_path / save, *extra)
        assert code == 0, err
        return out, load_checkpoint(tmp_path / save / "checkpoint.pth")["speed"]

    out, first = search("a")
    assert timed == [16] and widths and "the fastest of" in out and first["gemm"]
    assert cache.cache_file().is_file()
    widths.clear()
    out, second = search("b")  # the same network on the same machine: nothing timed
    assert timed == [16] and widths == [] and second == first
    assert ("training in channels-last bf16 autocast, 2 convolutions partly as im2col + GEMM, as timed for this "
            f"network on this machine before (remembered in {cache.cache_file()}") in out
    search("c", "--batch-size", 8)  # another batch: timed again
    assert timed == [16, 8]
    cache.cache_file().write_text("{not json")  # a damaged cache is timed over and rewritten, in one line
    out, _ = search("d")
    assert timed == [16, 8, 16] and json.loads(cache.cache_file().read_text())
    assert f"the speed-choice cache {cache.cache_file()} could not be read (JSONDecodeError): timing" in out
    cache.cache_file().write_bytes(b"\x80\xff garbage")  # not even text
    out, _ = search("d2")
    assert timed == [16, 8, 16, 16] and "could not be read (UnicodeDecodeError)" in out
    out, _ = search("e", "--cpu-kernels", "off")  # plain PyTorch: its own timing, nothing remembered
    assert timed == [16, 8, 16, 16, 16] and "as timed for this network" not in out
