"""The reference's pruned ImageNet ResNets (resnet_imagenet.resnet18(cfg) with its channel
selections, hand_resnet50.resnet50_prune(cfg)), built here as the reference's model code builds
them, imported alone or as the EVAL scripts' pair, then evaluated, retrained and exported."""
import pytest
import torch
from torch import nn

from conftest import randomize_bn
from earlybird.cli import main
from earlybird.cost import count_macs
from earlybird.prune import SelectConv2d
from earlybird.train import load_checkpoint, model_from_checkpoint
from test_imagenet import imagenet_root  # noqa: F401 - the fixture
from test_reference_import import _Select, reference_layout

PLANES = (16, 32, 64, 128)  # the ImageNet planes at --width 0.25
CLASSES = 3  # the small ImageNet folder's


class _RefBasicBlock(nn.Module):
    """resnet_imagenet's BasicBlock: the selection on the block input picks what conv1 reads;
    cfg = [channels selected, conv1 outputs]; conv2 writes the whole stream."""

    def __init__(self, inplanes, planes, cfg, stride):
        super().__init__()
        self.select = _Select(inplanes)
        self.conv1 = nn.Conv2d(cfg[0], cfg[1], 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg[1])
        self.conv2 = nn.Conv2d(cfg[1], planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                           if stride != 1 or inplanes != planes else None)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(self.select(x))))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _RefResNet18(nn.Module):
    """resnet_imagenet.resnet18(cfg): 17 cfg entries, block i reading [2i, 2i + 2); the stem's
    selection (registered after fc) passes every channel."""

    def __init__(self, cfg, blocks=(2, 2, 2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, PLANES[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(PLANES[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, i = PLANES[0], 0
        for s, (planes, n) in enumerate(zip(PLANES, blocks)):
            layers = []
            for b in range(n):
                layers.append(_RefBasicBlock(inplanes, planes, cfg[2 * i:2 * i + 2], 2 if s and not b else 1))
                inplanes, i = planes, i + 1
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AvgPool2d(7)
        self.fc = nn.Linear(PLANES[3], CLASSES)
        self.select = _Select(PLANES[0])

    def forward(self, x):
        x = self.maxpool(torch.relu(self.select(self.bn1(self.conv1(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class _RefBottleneck(nn.Module):
    """hand_resnet50's pruned bottleneck: conv1/conv2 at their cfg widths, conv3 and the
    downsample (a conv with a bias) at the stage's stream width."""

    def __init__(self, inplanes, c1, c2, width, stride, downsample):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, c1, 1, bias=False), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, stride, 1, bias=False), nn.BatchNorm2d(c2)
        self.conv3, self.bn3 = nn.Conv2d(c2, width, 1, bias=False), nn.BatchNorm2d(width)
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, width, 1, stride, bias=True), nn.BatchNorm2d(width))
                           if downsample else None)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x.clone() if self.downsample is None else self.downsample(x)))


class _RefResNet50(nn.Module):
    """resnet50_prune(cfg): cfg = [stem, stem] + [conv1, conv2, conv3] per block; a stage's stream
    width is its first block's conv3 entry."""

    def __init__(self, cfg, blocks=(3, 4, 6, 3)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, cfg[0], 7, 2, 3, bias=False), nn.BatchNorm2d(cfg[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, i = cfg[0], 0
        for s, n in enumerate(blocks):
            width, layers = cfg[4 + 3 * i], []
            for b in range(n):
                c1, c2 = cfg[2 + 3 * i:4 + 3 * i]
                layers.append(_RefBottleneck(inplanes, c1, c2, width, 2 if s and not b else 1, not b))
                inplanes, i = width, i + 1
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AvgPool2d(7)
        self.fc = nn.Linear(inplanes, CLASSES)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _resnet18(g, blocks=(2, 2, 2, 2)):
    """A pruned reference ResNet-18 (or 34) with random widths and selections (as resprune.py leaves them)."""
    cfg, inplanes = [], PLANES[0]
    for planes, n in zip(PLANES, blocks):
        for _ in range(n):
            cfg += [int(torch.randint(1, inplanes + 1, (1,), generator=g)), int(torch.randint(1, planes + 1, (1,),
                                                                                             generator=g))]
            inplanes = planes
    cfg.append(PLANES[3])  # unused, as in the reference
    ref = randomize_bn(_RefResNet18(cfg, blocks))
    with torch.no_grad():
        blocks = [m for m in ref.modules() if isinstance(m, _RefBasicBlock)]
        for block, count in zip(blocks, cfg[0::2]):
            block.select.indexes.zero_()
            block.select.indexes[torch.randperm(block.select.indexes.numel(), generator=g)[:count]] = 1
    return ref.eval(), cfg


def _resnet50(g):
    """A pruned reference ResNet-50 with random widths (streams and stem pruned too)."""
    def some(n):
        return int(torch.randint(max(1, n // 2), n + 1, (1,), generator=g))

    stem, cfg = some(PLANES[0]), []
    for planes, n in zip(PLANES, (3, 4, 6, 3)):
        width = some(planes * 4)  # the stage's stream
        for b in range(n):
            cfg += [some(planes), some(planes), width if not b else some(planes * 4)]
    cfg = [stem, stem] + cfg
    return randomize_bn(_RefResNet50(cfg)).eval(), cfg


def _save(path, ref, **extra):
    torch.save({"state_dict": reference_layout(ref.state_dict(), "resnet"), **extra}, path)


def _import(tmp_path, name, depth, *files):
    out = tmp_path / f"{name}.pth"
    code = main(["import-reference", *map(str, files), "--arch", "resnet", "--depth", str(depth), "--width", "0.25",
                 "--dataset", "imagenet", "--out", str(out)])
    return code, out


def _same(path, ref, g):
    model, _, plan = model_from_checkpoint(load_checkpoint(path))
    x = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model.eval()(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    return model, plan


@pytest.mark.parametrize("depth", [18, 50])
def test_a_pruned_reference_imagenet_resnet_imports_alone_and_as_the_eval_pair(tmp_path, capsys, imagenet_root, depth):
    g = torch.Generator().manual_seed(depth)
    ref, cfg = (_resnet18 if depth == 18 else _resnet50)(g)
    _save(tmp_path / "pruned.pth.tar", ref, cfg=cfg)
    code, out = _import(tmp_path, "alone", depth, "--model", tmp_path / "pruned.pth.tar")
    assert code == 0, capsys.readouterr().err
    assert f"as a pruned resnet{depth}" in capsys.readouterr().out
    model, plan = _same(out, ref, g)
    assert plan is not None and model.fc.out_features == CLASSES
    # conv1 gathers what the selection picks: the MACs are the reference's own
    assert count_macs(model, (3, 224, 224)) == count_macs(ref, (3, 224, 224))
    if depth == 18:
        assert {n for n in plan.selects if n.endswith("conv1")} and all(
            isinstance(model.get_submodule(n), SelectConv2d) for n in plan.selects)
    if depth == 50:  # the stem and the streams are the reference's widths
        assert model.conv1.out_channels == cfg[0] and model.fc.in_features == cfg[4 + 3 * 13]

    # the EVAL scripts' pair: the architecture file, and weights retrained from it
    retrained = randomize_bn(type(ref)(cfg), seed=7).eval()
    with torch.no_grad():  # retraining keeps the selections
        for a, b in zip(retrained.modules(), ref.modules()):
            if isinstance(a, _Select):
                a.indexes.copy_(b.indexes)
    _save(tmp_path / "model_best.pth.tar", retrained, epoch=90, best_prec1=70.1)
    code, out = _import(tmp_path, "pair", depth, "--scratch", tmp_path / "pruned.pth.tar", "--resume",
                        tmp_path / "model_best.pth.tar")
    assert code == 0, capsys.readouterr().err
    _same(out, retrained, g)
    assert load_checkpoint(out)["test_acc"] == 70.1
    # the weights file alone holds both (its selections, its widths): the same network
    assert _import(tmp_path, "weights", depth, "--resume", tmp_path / "model_best.pth.tar")[0] == 0
    _same(tmp_path / "weights.pth", retrained, g)

    data = ["--data", str(imagenet_root), "--workers", "1", "--device", "cpu"]
    assert main(["eval", "--model", str(out), *data]) == 0
    assert '"test_images": 7' in capsys.readouterr().out
    assert main(["retrain", "--model", str(out), "--start-epoch", "0", "--epochs", "1", "--batch-size", "6", "--cpu-kernels", "off",
                 "--save", str(tmp_path / "re"), *data]) == 0
    for fmt in ("onnx", "torchscript"):
        assert main(["export", "--model", str(tmp_path / "re" / "model_best.pth"), "--format", fmt]) == 0


def test_a_pruned_reference_resnet34_imports_with_the_same_forward_and_macs(tmp_path, capsys):
    g = torch.Generator().manual_seed(34)
    ref, cfg = _resnet18(g, (3, 4, 6, 3))
    _save(tmp_path / "pruned.pth.tar", ref, cfg=cfg)
    code, out = _import(tmp_path, "r34", 34, "--model", tmp_path / "pruned.pth.tar")
    assert code == 0, capsys.readouterr().err
    model, _ = _same(out, ref, g)
    assert count_macs(model, (3, 224, 224)) == count_macs(ref, (3, 224, 224))


def _one_line(capsys, code, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2 and "warning: unpickling" in err[0], err  # the warning, then the error
    for needle in needles:
        assert needle in err[1], err[1]


def test_a_cfg_selections_or_weights_of_another_network_are_one_line(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    ref, cfg = _resnet18(g)
    _save(tmp_path / "short.pth.tar", ref, cfg=cfg[:-3])
    _one_line(capsys, _import(tmp_path, "a", 18, "--model", tmp_path / "short.pth.tar")[0],
              "a cfg of 14 widths", "of 8 blocks has 17", "--depth")
    wrong = list(cfg)
    wrong[4] += 1  # block 2 reads one channel more than its selection picks
    _save(tmp_path / "wrong.pth.tar", ref, cfg=wrong)
    _one_line(capsys, _import(tmp_path, "b", 18, "--model", tmp_path / "wrong.pth.tar")[0],
              "layer2.0.select", "cfg and the weights are of different networks")
    other, other_cfg = _resnet18(torch.Generator().manual_seed(1))
    _save(tmp_path / "arch.pth.tar", ref, cfg=cfg)
    _save(tmp_path / "weights.pth.tar", other, epoch=3)
    _one_line(capsys, _import(tmp_path, "c", 18, "--scratch", tmp_path / "arch.pth.tar", "--resume",
                              tmp_path / "weights.pth.tar")[0], "hold different networks", "retrained from that")
    with torch.no_grad():  # a selection that picks none of the channels its conv1 reads
        [m for m in ref.modules() if isinstance(m, _RefBasicBlock)][3].select.indexes.zero_()
    _save(tmp_path / "sel.pth.tar", ref)
    _one_line(capsys, _import(tmp_path, "d", 18, "--model", tmp_path / "sel.pth.tar")[0],
              "layer2.1's selection picks 0 of 32 channels", "different networks")
    ref, _ = _resnet18(torch.Generator().manual_seed(0))
    with torch.no_grad():  # the stem's selection must pass every channel: layer1 reads them all
        ref.select.indexes[0] = 0
    _save(tmp_path / "stem.pth.tar", ref)
    _one_line(capsys, _import(tmp_path, "f", 18, "--model", tmp_path / "stem.pth.tar")[0],
              "selects channels at 'the stem'", "passes them all")
    _, bad50 = _resnet50(g)
    ref50 = randomize_bn(_RefResNet50(bad50)).eval()
    _save(tmp_path / "r50.pth.tar", ref50, cfg=bad50[:-1])
    _one_line(capsys, _import(tmp_path, "e", 50, "--model", tmp_path / "r50.pth.tar")[0], "cfg of 49 widths",
              "has 50")
