"""Per-device speed settings: the memory-format choice, its hazards, and the allocator setting."""
import copy
import json
import platform
import time

import pytest
import torch

from earlybird import ModelSpec, create_model
from earlybird.accel import speed
from earlybird.accel import tuning
from earlybird.accel.tuning import (AUTOCAST_MAX_SLOWDOWN, channels_last_hazards, fastest_setting, keep_freed_memory,
                                    safe_formats, side_by_side, step_runs, step_timings)

from test_cli import assert_one_line_error, cli

NARROW_RESNET = ["--arch", "resnet18", "--width", "0.0625", "--batch-size", "16", "--epochs", "1", "--schedule", "1", "--ratios", "0.5",
                 "--seed", "0"]


def test_narrow_strided_1x1_convs_are_hazards_and_wide_ones_are_not():
    narrow = create_model(ModelSpec("resnet", 18, 0.0625, 3, 10, 32))  # 4..32 channels
    # downsamples read 4, 8 and 16 channels: the first two are under the block of 16
    cpu = torch.device("cpu")
    assert channels_last_hazards(narrow, cpu) == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    assert channels_last_hazards(create_model(ModelSpec("resnet", 18, 0.25, 3, 10, 32)), cpu) == []
    assert channels_last_hazards(create_model(ModelSpec("vgg", 11, 0.0625, 3, 10, 32)), cpu) == []
    assert channels_last_hazards(narrow, torch.device("cuda")) == []  # a oneDNN (CPU) bug


def test_only_safe_formats_are_offered():
    cpu = torch.device("cpu")
    assert safe_formats(create_model(ModelSpec("resnet", 18, 0.0625, 3, 10, 32)), cpu) == [False]  # it would crash
    assert safe_formats(create_model(ModelSpec("vgg", 11, 0.0625, 3, 10, 32)), cpu) == [False, True]


def test_each_setting_is_timed_in_its_format_and_precision():
    model = create_model(ModelSpec("vgg", 11, 0.0625, 3, 10, 32))
    seen = []  # the hook is copied along with the model into the probes
    model.features[0].register_forward_hook(lambda m, i, out: seen.append((out.is_contiguous(), out.dtype)))
    settings = [(False, None), (True, torch.bfloat16)]
    timings = step_timings(model, (3, 32, 32), 10, 2, torch.device("cpu"), settings, repeats=1)
    assert list(timings) == settings and all(t > 0 for t in timings.values())
    # alternating, warm-up included: contiguous fp32, then channels-last bf16
    assert seen == [(True, torch.float32), (False, torch.bfloat16)] * 2


def test_two_models_are_timed_in_one_interleaved_series():
    calls = []

    def run(name, seconds):
        def fn():
            calls.append(name)
            return seconds.pop(0)
        return fn

    # the dense model's warm-up is slow and one of its steps hits a slow moment: the medians skip both
    dense = {(True, None): run("dense", [9.0, 1.0, 5.0, 1.2])}
    pruned = {(False, None): run("pruned fp32", [9.0, 0.5, 0.4, 0.6]), (True, None): run("pruned cl", [9.0, 0.3, 0.3, 0.3])}
    assert side_by_side([dense, pruned]) == [{(True, None): 1.2}, {(False, None): 0.5, (True, None): 0.3}]
    assert calls == ["dense", "pruned fp32", "pruned cl"] * 4
    model = create_model(ModelSpec("vgg", 11, 0.0625, 3, 10, 32))
    runs = step_runs(model, (3, 32, 32), 10, 2, torch.device("cpu"), [(False, None), (True, None)])
    assert list(runs) == [(False, None), (True, None)] and all(fn() > 0 for fn in runs.values())


def test_timing_leaves_the_model_as_it_was_and_picks_the_fastest():
    model = create_model(ModelSpec("vgg", 11, 0.125, 3, 10, 32)).train()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    best, timings = fastest_setting(model, (3, 32, 32), 10, 8, torch.device("cpu"), [(False, None), (True, None)],
                                    repeats=1)
    assert timings[best] == min(timings.values())
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert all(p.grad is None and p.is_contiguous() for p in model.parameters())


def test_channels_last_on_a_hazard_is_refused_and_auto_avoids_it(capsys, tmp_path, cifar10_root):
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, *NARROW_RESNET,
                         "--channels-last", "--save", tmp_path / "on")
    assert_one_line_error(code, err, "layer2.0.downsample.0", "--channels-last off")
    assert not (tmp_path / "on" / "checkpoint.pth").exists()
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, *NARROW_RESNET,
                         "--save", tmp_path / "auto")
    assert code == 0, err
    assert "memory format: contiguous (channels-last would break layer 'layer2.0.downsample.0'" in out
    assert "channels-last fp32" not in out  # only the safe format was timed (with and without autocast)


TINY_VGG = ["--arch", "vgg", "--depth", "11", "--width", "0.0625", "--batch-size", "16", "--epochs", "1", "--schedule",
            "1", "--ratios", "0.5"]


def test_auto_trains_in_the_fastest_measured_setting(capsys, tmp_path, cifar10_root, monkeypatch):
    monkeypatch.setattr(speed, "autocast_slowdown", lambda kind, dtype: 1.0)  # bf16 worth timing on any CPU
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, *TINY_VGG,
                         "--save", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    line = next(line for line in out.splitlines() if line.startswith("training in "))
    assert line.startswith(f"training in {summary['memory_format']} {summary['precision']}, the fastest of: ")
    for name in ("contiguous fp32", "channels-last fp32", "contiguous bf16 autocast", "channels-last bf16 autocast"):
        assert name in line
    # deterministic runs do not let a timing pick their rounding
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, *TINY_VGG,
                         "--deterministic", "--save", tmp_path / "det")
    assert code == 0, err
    summary = json.loads((tmp_path / "det" / "summary.json").read_text())
    assert "training in" not in out and (summary["memory_format"], summary["precision"]) == ("contiguous", "fp32")


def test_auto_does_not_time_a_precision_the_probe_finds_far_slower(capsys, tmp_path, cifar10_root, monkeypatch):
    monkeypatch.setattr(speed, "autocast_slowdown", lambda kind, dtype: AUTOCAST_MAX_SLOWDOWN + 0.5)
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, *TINY_VGG,
                         "--save", tmp_path / "run")
    assert code == 0, err
    assert (f"precision: fp32 (bf16 autocast took {AUTOCAST_MAX_SLOWDOWN + 0.5:.1f}x as long as fp32 for a probe "
            "convolution on this CPU, so it was not timed; --amp on forces it)") in out
    line = next(line for line in out.splitlines() if line.startswith("training in "))
    assert "contiguous fp32" in line and "channels-last fp32" in line and "bf16" not in line
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["precision"] == "fp32"
    monkeypatch.setattr(speed, "autocast_slowdown", lambda kind, dtype: AUTOCAST_MAX_SLOWDOWN)  # at the limit: timed
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, *TINY_VGG,
                         "--save", tmp_path / "limit")
    assert code == 0, err
    assert "precision: fp32" not in out and "channels-last bf16 autocast" in out


def test_the_precision_probe_measures_the_autocast_type_against_fp32(monkeypatch):
    def conv2d(x, w, **kwargs):  # a probe convolution that takes 20 ms in fp32 and 100 in bf16
        time.sleep(0.02 if x.dtype == torch.float32 else 0.1)

    tuning.autocast_slowdown.cache_clear()
    monkeypatch.setattr(tuning.F, "conv2d", conv2d)
    assert 4 < tuning.autocast_slowdown("cpu", torch.bfloat16) < 6
    assert tuning.autocast_slowdown("cuda", torch.bfloat16) == 1.0  # GPUs time their steps
    monkeypatch.undo()
    tuning.autocast_slowdown.cache_clear()
    assert 0.5 < tuning.autocast_slowdown("cpu", torch.float32) < 2  # the real convolution against itself
    tuning.autocast_slowdown.cache_clear()


def test_amp_on_a_cpu_trains_in_bf16_and_refuses_the_low_precision_formats(capsys, tmp_path, cifar10_root):
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, *TINY_VGG, "--amp",
                         "--channels-last", "off", "--save", tmp_path / "bf16")
    assert code == 0, err
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["precision"] == "bf16 autocast" and 0 <= summary["final_test_acc"] <= 100  # a NaN loss would fail
    code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, *TINY_VGG, "--amp", "on",
                       "--wl-weight", "8", "--save", tmp_path / "lp")
    assert_one_line_error(code, err, "--amp", "do not mix")
    # auto with the low-precision formats simply stays in fp32
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, *TINY_VGG, "--wl-weight",
                         "8", "--channels-last", "off", "--save", tmp_path / "lp-auto")
    assert code == 0, err
    assert json.loads((tmp_path / "lp-auto" / "summary.json").read_text())["precision"] == "fp32"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_takes_effect_on_glibc():
    assert keep_freed_memory() is True


@pytest.mark.parametrize("flag,calls", [(["--cpu-kernels", "on"], 1), (["--cpu-kernels", "off"], 0)])
def test_the_allocator_setting_follows_the_flag(capsys, tmp_path, cifar10_root, monkeypatch, flag, calls):

    made = []
    monkeypatch.setattr(speed, "keep_freed_memory", lambda: made.append(1) or True)
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--arch", "vgg", "--depth",
                         "11", "--width", "0.0625", "--batch-size", "16", "--epochs", "1", "--schedule", "1",
                         "--ratios", "0.5", "--channels-last", "off", *flag, "--save", tmp_path / "run")
    assert code == 0, err
    assert len(made) == calls
