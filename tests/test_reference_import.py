"""Checkpoints the reference implementation wrote, imported (import-reference) and then pruned,
evaluated and retrained by earlybird."""
import pytest
import torch

from conftest import randomize_bn
from earlybird.cli import main
from earlybird.models.vgg import VGG

from earlybird import CheckpointError, ModelSpec, create_model
from earlybird.train import load_checkpoint, model_from_checkpoint


def reference_layout(state, arch):
    """A state dict as the reference scripts save it: DataParallel prefix, their layer names."""
    out = {}
    for k, v in state.items():
        if arch == "vgg":
            k = k.replace("features.", "feature.")
        if arch == "preresnet":
            k = k.replace("downsample.", "downsample.0.")
        out["module." + k] = v
    if arch == "preresnet":
        out.setdefault("module.layer1.0.select.indexes", torch.ones(4))
    return out


def test_import_reference_vgg_dense_and_pruned(tmp_path, capsys, small_vgg):
    ref = tmp_path / "EB-30-5.pth.tar"
    torch.save({"state_dict": reference_layout(small_vgg.state_dict(), "vgg"), "epoch": 5, "best_prec1": 41.5,
                "cfg": [8, "M", 16]}, ref)
    with pytest.raises(CheckpointError, match="import-reference"):
        load_checkpoint(ref)
    args = ["import-reference", "--model", ref, "--arch", "vgg11", "--width", 0.125, "--dataset", "cifar10"]
    assert main([str(a) for a in args]) == 0
    out, err = capsys.readouterr()
    assert "only files you trust" in err and "a dense vgg11" in out
    model, spec, plan = model_from_checkpoint(load_checkpoint(tmp_path / "EB-30-5.earlybird.pth"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert plan is None and torch.equal(model.eval()(x), small_vgg(x))
    assert main([str(a) for a in args]) == 2  # never overwritten without --force
    assert "--force" in capsys.readouterr().err

    # a pruned reference VGG: compacted weights and a cfg of kept counts
    torch.manual_seed(0)
    cfg = [3, "M", 9, "M", 20, 11, "M", 40, 7, "M", 33, 64]
    small = randomize_bn(VGG(cfg, 3, 10)).eval()
    ref = tmp_path / "pruned.pth.tar"
    torch.save({"state_dict": reference_layout(small.state_dict(), "vgg"), "cfg": cfg, "epoch": 160}, ref)
    assert main(["import-reference", "--model", str(ref), "--arch", "vgg", "--depth", "11", "--width", "0.125",
                 "--dataset", "cifar10", "--out", str(tmp_path / "p.pth")]) == 0
    model, _, plan = model_from_checkpoint(load_checkpoint(tmp_path / "p.pth"))
    assert [len(v) for v in plan.keep.values()] == [c for c in cfg if c != "M" and c != 64]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), small(x))


def test_import_reference_preresnet_and_mismatches(tmp_path, capsys):
    torch.manual_seed(0)
    spec = ModelSpec("preresnet", 20, 0.25, 3, 10, 32)
    net = randomize_bn(create_model(spec)).eval()
    ref = tmp_path / "ckpt.pth.tar"
    torch.save({"state_dict": reference_layout(net.state_dict(), "preresnet")}, ref)
    assert main(["import-reference", "--model", str(ref), "--arch", "preresnet", "--depth", "20", "--width", "0.25",
                 "--out", str(tmp_path / "a.pth")]) == 0
    model, _, _ = model_from_checkpoint(load_checkpoint(tmp_path / "a.pth"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), net(x))
    capsys.readouterr()
    code = main(["import-reference", "--model", str(ref), "--arch", "vgg", "--out", str(tmp_path / "b.pth")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--arch, --depth and --dataset" in err[-1] and len(err) == 2  # the warning, the error
    assert not (tmp_path / "b.pth").exists()


def test_a_reference_checkpoint_with_a_numpy_best_prec1_imports_and_then_loads(tmp_path, capsys, small_vgg,
                                                                              cifar10_root):
    import numpy as np

    ref = tmp_path / "model_best.pth.tar"  # as the reference's main.py writes it: best_prec1 = np.round(...)
    torch.save({"state_dict": reference_layout(small_vgg.state_dict(), "vgg"), "epoch": 5,
                "best_prec1": np.round(np.float64(41.5312), 2), "cfg": [8, "M", 16]}, ref)
    assert main(["import-reference", "--model", str(ref), "--arch", "vgg", "--depth", "11", "--width", "0.125",
                 "--dataset", "cifar10"]) == 0
    converted = load_checkpoint(tmp_path / "model_best.earlybird.pth")  # weights-only: it would refuse a numpy scalar
    assert type(converted["test_acc"]) is float and converted["test_acc"] == 41.53
    capsys.readouterr()
    data = ["--data", str(cifar10_root), "--device", "cpu", "--cpu-kernels", "off"]
    assert main(["eval", "--model", str(tmp_path / "model_best.earlybird.pth"), *data[:-2]]) == 0
    assert main(["prune", "--model", str(tmp_path / "model_best.earlybird.pth"), *data]) == 0
    pruned = tmp_path / "pruned-50" / "pruned.pth"
    assert model_from_checkpoint(load_checkpoint(pruned))[2] is not None
    assert main(["retrain", "--model", str(pruned), "--epochs", "6", "--batch-size", "16", *data]) == 0  # from epoch 5


def test_prune_keep_streams_gives_the_reference_widths_on_an_imported_preresnet56(tmp_path, capsys, cifar10_root):
    """resprune.py never prunes a residual stream; an imported checkpoint records no such choice,
    so `prune --keep-streams` asks for it: streams stay at full width, in-block widths follow the mask."""
    torch.manual_seed(0)
    net = randomize_bn(create_model(ModelSpec("preresnet", 56, 1.0, 3, 10, 32))).eval()
    with torch.no_grad():  # four channels of the last stream that sparsity training silenced in every reader
        for name, m in net.named_modules():  # (the first two streams also feed a downsample conv: never pruned)
            if name == "bn" or (name.endswith("bn1") and name.startswith("layer3.") and name != "layer3.0.bn1"):
                m.weight[:4] = 1e-3 * torch.arange(1, 5)
    ref = tmp_path / "EB-30-10.pth.tar"
    torch.save({"state_dict": reference_layout(net.state_dict(), "preresnet"), "epoch": 10, "best_prec1": 30.0}, ref)
    imported = tmp_path / "eb.pth"
    assert main(["import-reference", "--model", str(ref), "--arch", "preresnet", "--depth", "56",
                 "--out", str(imported)]) == 0
    common = ["prune", "--model", str(imported), "--percent", "0.4", "--round-to", "1", "--data", str(cifar10_root),
              "--device", "cpu", "--cpu-kernels", "off"]
    capsys.readouterr()
    assert main(common + ["--keep-streams", "--save", str(tmp_path / "kept")]) == 0
    out = capsys.readouterr().out
    assert "note: --keep-streams on overrides the default for a checkpoint that records none (off)" in out
    kept = dict(model_from_checkpoint(load_checkpoint(tmp_path / "kept" / "pruned.pth"))[0].named_modules())

    # the mask earlybird draws at 0.4 over every BN (all of them stay prunable when streams are kept)
    bns = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    gammas = torch.cat([m.weight.detach().abs() for m in bns.values()])
    order = torch.argsort(gammas, stable=True)
    keep = torch.ones(len(gammas), dtype=torch.bool)
    keep[order[:int(len(gammas) * 0.4)]] = False
    widths = dict(zip(bns, (int(k.sum()) for k in keep.split([m.num_features for m in bns.values()]))))
    dense = dict(net.named_modules())
    assert kept["conv1"].out_channels == 16 and kept["fc"].in_features == widths["bn"]
    assert kept["bn"].in_channels == 256 and kept["bn"].num_features == widths["bn"]
    for name, block in dense.items():
        if name.count(".") != 1 or not name.startswith("layer"):
            continue
        b = {k: kept[f"{name}.{k}"] for k in ("bn1", "conv1", "bn2", "conv2", "bn3", "conv3")}
        assert b["conv3"].out_channels == block.conv3.out_channels  # the stream: full width
        if block.downsample is not None:
            assert kept[f"{name}.downsample"].out_channels == block.downsample.out_channels
        assert b["bn1"].in_channels == block.bn1.num_features and b["bn1"].num_features == widths[f"{name}.bn1"]
        assert (b["conv1"].in_channels, b["conv1"].out_channels) == (widths[f"{name}.bn1"], widths[f"{name}.bn2"])
        assert (b["conv2"].out_channels, b["conv3"].in_channels) == (widths[f"{name}.bn3"],) * 2

    # without the flag the streams are pruned: another network than the reference's
    assert main(common + ["--save", str(tmp_path / "streams")]) == 0
    assert "note:" not in capsys.readouterr().out
    pruned = dict(model_from_checkpoint(load_checkpoint(tmp_path / "streams" / "pruned.pth"))[0].named_modules())
    assert pruned["layer3.0.conv3"].out_channels == pruned["layer3.0.downsample"].out_channels == 252


class _Select(torch.nn.Module):
    """The reference's channel_selection: a 0/1 ``indexes`` vector (a parameter) picks input channels."""

    def __init__(self, channels):
        super().__init__()
        self.indexes = torch.nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x[:, torch.nonzero(self.indexes).flatten()]


class _RefBlock(torch.nn.Module):
    """The reference's pruned PreResNet bottleneck: bn1 over the whole stream, then its selection;
    cfg = [channels selected, conv1 outputs, conv2 outputs]; conv3 writes the whole stream."""

    def __init__(self, inplanes, planes, cfg, stride):
        super().__init__()
        conv = torch.nn.Conv2d
        self.bn1, self.select = torch.nn.BatchNorm2d(inplanes), _Select(inplanes)
        self.conv1, self.bn2 = conv(cfg[0], cfg[1], 1, bias=False), torch.nn.BatchNorm2d(cfg[1])
        self.conv2, self.bn3 = conv(cfg[1], cfg[2], 3, stride, 1, bias=False), torch.nn.BatchNorm2d(cfg[2])
        self.conv3 = conv(cfg[2], planes * 4, 1, bias=False)
        self.downsample = (conv(inplanes, planes * 4, 1, stride, bias=False)  # saved as downsample.0
                           if stride != 1 or inplanes != planes * 4 else None)

    def forward(self, x):
        out = self.conv1(torch.relu(self.select(self.bn1(x))))
        out = self.conv3(torch.relu(self.bn3(self.conv2(torch.relu(self.bn2(out))))))
        return out + (x if self.downsample is None else self.downsample(x))


class _RefPreResNet(torch.nn.Module):
    """What resprune.py builds from ``cfg`` (one entry per BN), at earlybird's --width 0.25."""

    def __init__(self, n, cfg, planes=(4, 8, 16), classes=10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, planes[0], 3, 1, 1, bias=False)
        inplanes, blocks = planes[0], []
        for s, p in enumerate(planes):
            for b in range(n):
                i = 3 * (s * n + b)
                blocks.append(_RefBlock(inplanes, p, cfg[i:i + 3], 2 if s and not b else 1))
                inplanes = p * 4
            setattr(self, f"layer{s + 1}", torch.nn.Sequential(*blocks))
            blocks = []
        self.bn, self.select = torch.nn.BatchNorm2d(inplanes), _Select(inplanes)
        self.fc = torch.nn.Linear(cfg[-1], classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.relu(self.select(self.bn(x))).mean((2, 3)))


def test_a_pruned_reference_preresnet_imports_and_evaluates_as_the_reference_computes(tmp_path, capsys, cifar10_root):
    g = torch.Generator().manual_seed(3)
    n, streams, planes = 2, (16, 32, 64), (4, 8, 16)
    full, inplanes = [], planes[0]  # the dense widths: [bn1 (the block's input), bn2, bn3] per block, then bn
    for s in range(3):
        for _ in range(n):
            full, inplanes = full + [inplanes, planes[s], planes[s]], streams[s]
    full.append(64)
    cfg = [int(torch.randint(1, w + 1, (1,), generator=g)) for w in full]
    cfg[1] = 4  # a layer the mask left whole
    ref = randomize_bn(_RefPreResNet(n, cfg)).eval()
    with torch.no_grad():
        for (name, sel), count in zip(((k, m) for k, m in ref.named_modules() if isinstance(m, _Select)),
                                      cfg[0::3][:2 * 3] + cfg[-1:]):
            sel.indexes.zero_()
            sel.indexes[torch.randperm(sel.indexes.numel(), generator=g)[:count]] = 1
    path = tmp_path / "pruned.pth.tar"
    torch.save({"cfg": cfg, "state_dict": reference_layout(ref.state_dict(), "preresnet")}, path)
    assert main(["import-reference", "--model", str(path), "--arch", "preresnet", "--depth", "20", "--width", "0.25",
                 "--dataset", "cifar10", "--out", str(tmp_path / "p.pth")]) == 0
    assert "as a pruned preresnet20" in capsys.readouterr().out
    model, _, plan = model_from_checkpoint(load_checkpoint(tmp_path / "p.pth"))
    dense = create_model(ModelSpec("preresnet", 20, 0.25, 3, 10, 32))
    assert len(plan.selects) == 7 and all(model.get_submodule(n).in_channels == dense.get_submodule(n).num_features
                                          for n in plan.selects)  # every stream kept whole
    x = torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=1e-5, atol=1e-5)
    args = ["--data", str(cifar10_root), "--device", "cpu", "--cpu-kernels", "off"]
    assert main(["eval", "--model", str(tmp_path / "p.pth")] + args[:-2]) == 0
    assert main(["retrain", "--scratch", str(tmp_path / "p.pth"), "--epochs", "1", "--batch-size", "16",
                 "--save", str(tmp_path / "re")] + args) == 0
    assert main(["export", "--model", str(tmp_path / "re" / "model_best.pth"), "--format", "torchscript"]) == 0
