"""Starting weights (--weights, earlybird.load_pretrained): each file format, the classifier and the
first conv fitted to the data, and files of another network refused in one line."""
import pytest
import torch

import earlybird
from earlybird import CheckpointError, ModelSpec, create_model
from earlybird.cli import main
from earlybird.train import load_checkpoint, save_checkpoint
from test_cli import TINY, assert_one_line_error, cli


def _vgg(channels=3, classes=100, depth=11, seed=0):
    torch.manual_seed(seed)
    return create_model(ModelSpec("vgg", depth, 0.0625, channels, classes, 32))


def _formats(tmp_path, source):
    """The same weights as each kind of file --weights takes."""
    state = source.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}, "arch": "vgg11"},
               tmp_path / "timm-style.pth.tar")  # DataParallel prefix, under state_dict
    torch.save({"model": state, "optimizer": {}}, tmp_path / "under-model.pt")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "weights.safetensors"))
    save_checkpoint(tmp_path / "earlybird.pth", "search", ModelSpec("vgg", 11, 0.0625, 3, 100, 32), source)
    return ["plain.pth", "timm-style.pth.tar", "under-model.pt", "weights.safetensors", "earlybird.pth"]


def test_every_format_loads_the_same_tensors_and_fits_the_classifier_and_the_stem(tmp_path):
    source = _vgg()
    for name in _formats(tmp_path, source):
        model = _vgg(channels=1, classes=10, seed=1)  # other classes, other input channels
        done = earlybird.load_pretrained(model, tmp_path / name)
        assert done.new == ["classifier.weight", "classifier.bias"], name
        assert done.adapted == ["features.0.weight (3 -> 1 input channels)"] and len(done.loaded) == len(model.state_dict()) - 3
        ours, theirs = model.state_dict(), source.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in done.loaded)
        # a gray image read by the adapted stem is the colour model's view of it in three equal channels
        x = torch.rand(2, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model.eval().features(x), source.eval().features(x.repeat(1, 3, 1, 1)))
    four = _vgg(channels=4, classes=100)
    done = earlybird.load_pretrained(four, tmp_path / "plain.pth")
    assert done.adapted == ["features.0.weight (3 -> 4 input channels)"] and not done.new
    w = source.state_dict()["features.0.weight"]
    torch.testing.assert_close(four.state_dict()["features.0.weight"], torch.cat([w, w[:, :1]], 1) * 0.75)


def test_weights_of_another_network_or_no_weights_are_one_line(tmp_path):
    torch.save(_vgg(depth=13).state_dict(), tmp_path / "vgg13.pth")
    with pytest.raises(CheckpointError, match=r"is of another network: features\.4\.weight \(file \(4,\), "
                                              r"network \(8, 4, 3, 3\)\), .* and \d+ more; pass weights of the same"):
        earlybird.load_pretrained(_vgg(), tmp_path / "vgg13.pth")
    torch.save({"model": _vgg()}, tmp_path / "pickled-module.pth")  # a whole module: objects, not tensors
    for name, needle in (("missing.pth", "does not exist"), ("pickled-module.pth", "save its state_dict()")):
        with pytest.raises(CheckpointError, match=needle):
            earlybird.load_pretrained(_vgg(), tmp_path / name)
    model = _vgg()
    save_checkpoint(tmp_path / "pruned.pth", "pruned", ModelSpec("vgg", 11, 0.0625, 3, 100, 32), model,
                    earlybird.prune_model(model.eval(), {n: torch.arange(m.num_features) % 2 == 0 for n, m in
                                                         model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)},
                                          torch.randn(2, 3, 32, 32))[1])
    with pytest.raises(CheckpointError, match="pruned earlybird checkpoint: retrain it"):
        earlybird.load_pretrained(_vgg(), tmp_path / "pruned.pth")


def test_a_search_starts_from_the_weights_and_a_wrong_file_stops_it_before_anything_is_written(capsys, tmp_path,
                                                                                             cifar10_root):
    source = _vgg()  # 100 classes: cifar10 gets a new classifier
    torch.save(source.state_dict(), tmp_path / "w.pth")
    still = ["--lr", "1e-9", "--momentum", "0", "--weight-decay", "0", "--no-sparsity-regularization",
             "--epochs", "1", "--ratios", "0.5"]  # one epoch that moves no weight
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY,
                         *still, "--weights", tmp_path / "w.pth", "--save", tmp_path / "s")
    assert code == 0, err
    assert f"starting weights {tmp_path / 'w.pth'}: loaded 48 tensors, left classifier.weight, classifier.bias new for the classes" in out
    trained = load_checkpoint(tmp_path / "s" / "checkpoint.pth")["state_dict"]
    for key, value in source.state_dict().items():
        if key.endswith("weight") and "classifier" not in key:
            torch.testing.assert_close(trained[key], value, rtol=0, atol=1e-6)
    torch.save(_vgg(depth=13).state_dict(), tmp_path / "other.pth")
    code, _, err = cli(capsys, "run", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY, *still,
                       "--weights", tmp_path / "other.pth", "--save", tmp_path / "r")
    assert_one_line_error(code, err, "is of another network", "features.4.weight")
    assert not (tmp_path / "r" / "search").exists()


def write_timm_cache(hub, model):
    """``model``'s weights where timm's pretrained=True leaves timm:resnet18's: a Hugging Face cache
    snapshot of timm/resnet18.a1_in1k."""
    from safetensors.torch import save_file

    snapshot = hub / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    save_file(model.state_dict(), str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_pretrained_reads_torchvisions_and_timms_own_caches_and_a_miss_is_one_line(capsys, tmp_path, cifar10_root,
                                                                                  monkeypatch):
    from test_zoo_models import _zoo

    torchvision, timm = _zoo("torchvision"), _zoo("timm")
    import huggingface_hub

    from earlybird.pretrained import library_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    search = ["search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", "--batch-size", 16,
              "--epochs", 1, "--ratios", 0.5, "--amp", "off", "--channels-last", "off"]
    code, _, err = cli(capsys, *search, "--arch", "torchvision:resnet18", "--pretrained", "--save", tmp_path / "a")
    assert_one_line_error(code, err, "torchvision's weights for resnet18 are not in its cache",
                          str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"), "--weights FILE")
    with pytest.raises(CheckpointError, match=r"timm's weights for resnet18 \(timm/resnet18.a1_in1k\) are not in the "
                                              r"Hugging Face cache .*pretrained=True"):
        library_weights("timm:resnet18")

    # the caches as the libraries write them
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(tv.state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    weights = write_timm_cache(tmp_path / "hub", timm.create_model("resnet18"))
    assert library_weights("timm:resnet18") == weights
    mine = timm.create_model("resnet18", num_classes=10, in_chans=1)
    done = earlybird.load_pretrained(mine, library_weights("timm:resnet18"))
    assert done.new == ["fc.weight", "fc.bias"] and done.adapted == ["conv1.weight (3 -> 1 input channels)"]

    code, out, err = cli(capsys, *search, "--arch", "torchvision:resnet18", "--pretrained", "--save", tmp_path / "b")
    assert code == 0, err
    assert "resnet18-f37072fd.pth: loaded 120 tensors, left fc.weight, fc.bias new for the classes" in out
    for flags, needle in ((["--arch", "vgg", "--pretrained"], "--pretrained applies to timm:NAME and torchvision:NAME"),
                          (["--arch", "vgg", "--pretrained", "--weights", "x.pth"], "both name the starting weights")):
        code, _, err = cli(capsys, *search, *flags, "--save", tmp_path / "c")
        assert_one_line_error(code, err, needle)


class _Patches(torch.nn.Module):
    """The smallest vision transformer front: patch embedding, class token, position embeddings."""

    def __init__(self, side):
        super().__init__()
        self.num_prefix_tokens = 1
        self.proj = torch.nn.Conv2d(3, 8, 4, 4)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, 1 + side * side, 8))
        self.head = torch.nn.Linear(8, 10)


def test_position_embeddings_of_another_image_size_are_resampled_to_the_networks_grid():
    torch.manual_seed(0)
    big = _Patches(8)
    with torch.no_grad():  # a smooth ramp over the grid, and a class token's own embedding
        ramp = torch.linspace(0, 1, 8)
        big.pos_embed[0, 1:] = (ramp[:, None] + ramp[None, :]).reshape(64, 1).expand(64, 8)
        big.pos_embed[0, 0] = 5.0
    small = _Patches(4)
    done = earlybird.load_pretrained(small, big.state_dict())
    assert done.adapted == ["pos_embed (8x8 -> 4x4 patches)"] and "pos_embed" not in done.loaded
    assert "adapted pos_embed (8x8 -> 4x4 patches)" in done.describe()
    grid = small.pos_embed[0, 1:, 0].reshape(4, 4)
    assert torch.equal(small.pos_embed[0, 0], torch.full((8,), 5.0))  # the class token's, as it was
    # the ramp, coarser: increasing along both axes, symmetric, within the original's range
    assert (grid[:, 1:] > grid[:, :-1]).all() and (grid[1:] > grid[:-1]).all()
    assert torch.allclose(grid, grid.T) and 0 <= grid.min() < grid.max() <= 2
    # counts that are no square grid behind the class token: a file of another network
    odd = _Patches(4)
    odd.pos_embed = torch.nn.Parameter(torch.zeros(1, 20, 8))
    with pytest.raises(CheckpointError, match=r"pos_embed \(file \(1, 20, 8\), network \(1, 17, 8\)\)"):
        earlybird.load_pretrained(small, odd.state_dict())
