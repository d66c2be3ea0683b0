"""Per-device speed settings: the memory-format choice, its hazards, and the allocator setting."""
import copy
import json
import platform

import pytest
import torch

from earlybird import ModelSpec, create_model
from earlybird.train.tuning import channels_last_hazards, faster_memory_format, format_timings, keep_freed_memory

from test_cli import assert_one_line_error, cli

NARROW_RESNET = ["--arch", "resnet18", "--width", "0.0625", "--batch-size", "16", "--epochs", "1", "--schedule", "1", "--ratios", "0.5",
                 "--seed", "0"]


def test_narrow_strided_1x1_convs_are_hazards_and_wide_ones_are_not():
    narrow = create_model(ModelSpec("resnet", 18, 0.0625, 3, 10, 32))  # 4..32 channels
    # downsamples read 4, 8 and 16 channels: the first two are under the block of 16
    assert channels_last_hazards(narrow) == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    assert channels_last_hazards(create_model(ModelSpec("resnet", 18, 0.25, 3, 10, 32))) == []
    assert channels_last_hazards(create_model(ModelSpec("vgg", 11, 0.0625, 3, 10, 32))) == []


def test_only_safe_formats_are_timed():
    cpu = torch.device("cpu")
    narrow = create_model(ModelSpec("resnet", 18, 0.0625, 3, 10, 32))
    assert list(format_timings(narrow, (3, 32, 32), 10, 4, cpu, repeats=1)) == [False]  # it would crash otherwise
    vgg = create_model(ModelSpec("vgg", 11, 0.0625, 3, 10, 32))
    timings = format_timings(vgg, (3, 32, 32), 10, 4, cpu, repeats=1)
    assert sorted(timings) == [False, True] and all(t > 0 for t in timings.values())


def test_steps_are_timed_in_the_training_precision():
    """Under --amp the formats are compared in the autocast type the training will use."""
    model = create_model(ModelSpec("vgg", 11, 0.0625, 3, 10, 32))
    seen = []
    model.features[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))  # copied along with the model
    format_timings(model, (3, 32, 32), 10, 2, torch.device("cpu"), torch.bfloat16, repeats=1, formats=[False])
    format_timings(model, (3, 32, 32), 10, 2, torch.device("cpu"), None, repeats=1, formats=[True])
    assert seen == [torch.bfloat16] * 2 + [torch.float32] * 2


def test_timing_the_formats_leaves_the_model_as_it_was():
    model = create_model(ModelSpec("vgg", 11, 0.125, 3, 10, 32)).train()
    before = copy.deepcopy(model.state_dict())
    faster, speedup = faster_memory_format(model, (3, 32, 32), 10, 8, torch.device("cpu"), repeats=1)
    assert isinstance(faster, bool) and speedup > 0 and faster == (speedup > 1.0)
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


def test_auto_reports_the_measured_choice(capsys, tmp_path, cifar10_root):
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--arch", "vgg",
                         "--depth", "11", "--width", "0.0625", "--batch-size", "16", "--epochs", "1", "--schedule", "1", "--ratios", "0.5",
                         "--save", tmp_path / "run")
    assert code == 0, err
    assert "memory format: " in out and "x the speed of contiguous on this device" in out
    chosen = json.loads((tmp_path / "run" / "summary.json").read_text())["memory_format"]
    assert f"memory format: {chosen} (" in out
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--arch", "vgg",
                         "--depth", "11", "--width", "0.0625", "--batch-size", "16", "--epochs", "1", "--schedule", "1", "--ratios", "0.5",
                         "--deterministic", "--save", tmp_path / "det")
    assert code == 0, err
    assert "memory format" not in out  # deterministic runs do not let a timing pick their rounding


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_takes_effect_on_glibc():
    assert keep_freed_memory() is True


@pytest.mark.parametrize("flag,calls", [([], 1), (["--no-keep-memory"], 0)])
def test_the_allocator_setting_follows_the_flag(capsys, tmp_path, cifar10_root, monkeypatch, flag, calls):
    from earlybird.stages import common
    made = []
    monkeypatch.setattr(common, "keep_freed_memory", lambda: made.append(1) or True)
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--arch", "vgg", "--depth",
                         "11", "--width", "0.0625", "--batch-size", "16", "--epochs", "1", "--schedule", "1",
                         "--ratios", "0.5", "--channels-last", "off", *flag, "--save", tmp_path / "run")
    assert code == 0, err
    assert len(made) == calls
