"""`earlybird run` on residual networks and a user's model, `eval`, and the prune report's extras."""
import json

import pytest

from earlybird.train import load_checkpoint
from test_cli import assert_one_line_error, cli

FAST = ["--dataset", "cifar10", "--no-download", "--batch-size", "16", "--test-batch-size", "64", "--seed", "0",
        "--epochs", "4", "--schedule", "2", "--ratios", "0.5", "--eb-window", "2", "--eb-threshold", "0.9",
        "--latency-batches", "2"]


@pytest.mark.parametrize("arch", [["--arch", "preresnet", "--depth", "20", "--width", "0.25"],
                                  ["--arch", "resnet18", "--width", "0.0625"]], ids=["preresnet20", "resnet18"])
def test_run_residual_networks(capsys, tmp_path, cifar10_root, arch):
    save = tmp_path / "run"
    code, out, err = cli(capsys, "run", "--data", cifar10_root, *FAST, *arch, "--measure-speed", "--save", save)
    assert code == 0, err
    row = json.loads((save / "summary.json").read_text())["ratios"][0]
    assert row["eb_epoch"] == 2 and row["acc_retrained"] is not None
    pruned = json.loads((save / "pruned-50" / "summary.json").read_text())
    assert pruned["max_output_diff_pruned_vs_masked"] < 1e-4
    assert pruned["params"]["after"] < pruned["params"]["before"]
    assert pruned["channels"]["requested"] >= pruned["channels"]["removed"] > 0
    assert set(pruned["throughput"]) == {"2"} and pruned["throughput"]["2"]["pruned"] > 0
    assert "prunable BN channels" in out and "img/s" in out

    # eval reads every kind of checkpoint and reports top-1 and top-5
    for ckpt in (save / "pruned-50" / "pruned.pth", save / "retrain-50" / "model_best.pth", save / "search" / "checkpoint.pth"):
        code, out, err = cli(capsys, "eval", "--model", ckpt, "--data", cifar10_root, "--no-download")
        assert code == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert 0 <= summary["top1"] <= summary["top5"] <= 100 and summary["params"] > 0
    best = json.loads((save / "retrain-50" / "summary.json").read_text())["best_test_acc"]
    code, out, _ = cli(capsys, "eval", "--model", save / "retrain-50" / "model_best.pth", "--data", cifar10_root)
    assert json.loads(out.strip().splitlines()[-1])["top1"] == best


def test_keep_streams_and_round_to(capsys, tmp_path, cifar10_root):
    save = tmp_path / "s"
    code, out, err = cli(capsys, "search", "--data", cifar10_root, *FAST[:-2], "--arch", "resnet18", "--width", "0.125",
                         "--keep-streams", "--full", "--save", save)
    assert code == 0, err
    search = json.loads((save / "summary.json").read_text())
    assert search["keep_streams"] and search["prunable_channels"] < search["bn_channels"]
    code, out, err = cli(capsys, "prune", "--model", save / "checkpoint.pth", "--percent", 0.5, "--round-to", 4,
                         "--latency-batches", "--data", cifar10_root, "--save", tmp_path / "p")
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert report["keep_streams"] and report["throughput"] == {} and report["training_throughput"] is None
    assert all(after % 4 == 0 or after == before for before, after in report["layers"].values())
    # the stream (stem BN and every block's last BN) is whole
    assert report["layers"]["bn1"][0] == report["layers"]["bn1"][1]
    assert report["max_output_diff_pruned_vs_masked"] < 1e-4


def test_user_model_and_unsupported_model(capsys, tmp_path, cifar10_root):
    code, _, err = cli(capsys, "run", "--data", cifar10_root, *FAST, "--arch", "test_prune_families:user_net",
                       "--save", tmp_path / "u")
    assert code == 0, err
    code, _, err = cli(capsys, "search", "--data", cifar10_root, *FAST[:-2], "--arch", "test_cli_families:shuffle_net",
                       "--save", tmp_path / "x")
    assert_one_line_error(code, err, "Transpose", "'0.bn'", "not supported")
    assert not (tmp_path / "x").exists()  # refused before anything was written
    code, _, err = cli(capsys, "search", "--data", cifar10_root, "--arch", "no_such_module:net", "--save", tmp_path / "y")
    assert_one_line_error(code, err, "cannot load --arch no_such_module:net")
    code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--arch",
                       "test_cli_families:five_classes",
                       "--save", tmp_path / "z")
    assert_one_line_error(code, err, "(2, 5)", "not (2, 10)", "num_classes")


def shuffle_net(num_classes=10, in_channels=3):
    from test_prune_families import Shuffle
    import torch.nn as nn

    return nn.Sequential(Shuffle(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def five_classes(num_classes=10, in_channels=3):
    from test_prune_families import UserNet

    return UserNet(5)


def test_prune_report_counts_dead_channels(capsys, tmp_path, cifar10_root):
    """MobileNetV2: channels its depthwise BNs mask leave the expansion layers too, and the report says so."""
    save = tmp_path / "s"
    code, _, err = cli(capsys, "search", "--data", cifar10_root, *FAST[:-2], "--arch", "mobilenetv2", "--width", "0.25",
                       "--full", "--save", save)
    assert code == 0, err
    code, out, err = cli(capsys, "prune", "--model", save / "checkpoint.pth", "--percent", 0.5, "--round-to", 1,
                         "--latency-batches", "--data", cifar10_root, "--save", tmp_path / "p")
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "summary.json").read_text())
    c = report["channels"]
    assert c["dead"] > 0 and f"{c['dead']} unasked went as they fed only masked BNs" in out
    assert c["removed"] <= c["requested"] + c["dead"] and report["selects"] == []
    assert report["max_output_diff_pruned_vs_masked"] < 1e-4
    assert report["test_acc"]["masked"] == report["test_acc"]["pruned"]


def sized_net(num_classes=10, in_channels=3, channels=8, pool="max"):
    """A user's builder with arguments of its own, for --model-kwargs."""
    import torch.nn as nn

    pooling = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(), pooling, nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, num_classes))


def test_model_kwargs_reach_the_builder_and_every_stage_rebuilds_with_them(capsys, tmp_path, cifar10_root):
    save = tmp_path / "k"
    code, out, err = cli(capsys, "run", "--data", cifar10_root, *FAST, "--arch", "test_cli_families:sized_net",
                         "--model-kwargs", "channels=12", "pool=avg", "--save", save)
    assert code == 0, err
    assert "test_cli_families:sized_net channels=12 pool='avg' (3x32x32 -> 10)" in out
    search = load_checkpoint(save / "search" / "checkpoint.pth")
    assert search["spec"]["kwargs"] == (("channels", 12), ("pool", "avg"))
    assert search["state_dict"]["0.weight"].shape[0] == 12
    # prune and retrain rebuilt the network from the checkpoint's spec: its kwargs included
    pruned = json.loads((save / "pruned-50" / "summary.json").read_text())
    assert pruned["max_output_diff_relative"] < 1e-5
    assert json.loads((save / "retrain-50" / "summary.json").read_text())["final_test_acc"] >= 0


@pytest.mark.parametrize("arch, kwargs, needle", [
    ("vgg", ["depth=6"], "--model-kwargs go to the builders of timm:, torchvision: and module:function models"),
    ("test_cli_families:sized_net", ["channels"], "--model-kwargs channels: write each as key=value"),
    ("test_cli_families:sized_net", ["chanels=4"], "unexpected keyword argument 'chanels'"),
])
def test_bad_model_kwargs_get_one_line(capsys, tmp_path, cifar10_root, arch, kwargs, needle):
    code, _, err = cli(capsys, "search", "--data", cifar10_root, *FAST[:-2], "--arch", arch, "--model-kwargs", *kwargs,
                       "--save", tmp_path / "s")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "s").exists()
