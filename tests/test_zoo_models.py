"""torchvision's and timm's models through the whole command: search -> prune -> retrain on small
CIFAR-format data (skipped where those libraries are not installed)."""
import importlib
import json
import sys
import types

import pytest

from test_cli import cli


def _zoo(name: str):
    """Import torchvision or timm; a CUDA build of torchvision on a CPU-only torch fails in its
    operator registrations, which its models do not need: those two modules are stubbed then."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(f"{name} is not installed")
    except RuntimeError:
        for module in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[module]
        for module in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[module] = types.ModuleType(module)
        return importlib.import_module(name)


@pytest.mark.parametrize("arch", ["timm:efficientnet_b0", "torchvision:resnext50_32x4d"])
def test_run_a_zoo_model(capsys, tmp_path, cifar10_root, arch):
    _zoo("torchvision")  # timm imports it
    _zoo(arch.split(":")[0])
    save = tmp_path / "run"
    code, out, err = cli(capsys, "run", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", "--arch", arch,
                         "--batch-size", 16, "--test-batch-size", 64, "--epochs", 3, "--schedule", 2, "--ratios", 0.5,
                         "--eb-window", 2, "--eb-threshold", 0.99, "--latency-batches", "--amp", "off",
                         "--channels-last", "off", "--cpu-kernels", "off", "--save", save)
    assert code == 0, err
    row = json.loads((save / "summary.json").read_text())["ratios"][0]
    pruned = json.loads((save / "pruned-50" / "summary.json").read_text())
    # relative: a dense net trained two epochs from scratch at lr 0.1 may have logits of 1e9
    assert pruned["max_output_diff_relative"] < 1e-5 and pruned["macs"]["after"] < pruned["macs"]["before"]
    if arch.endswith("resnext50_32x4d"):
        assert pruned["grouped"] and all(g["groups"] == 32 for g in pruned["grouped"].values())
        assert "grouped convolutions lost the same channel positions" in out
    else:
        assert pruned["shift_zeroed"]  # squeeze-and-excitation gates
        assert "have their shift zeroed as well" in out
    retrain = json.loads((save / "retrain-50" / "summary.json").read_text())
    assert retrain["epochs_trained"] == 3 - row["eb_epoch"] and retrain["final_test_acc"] >= 0


def test_models_that_take_an_input_size_get_the_datas():
    _zoo("torchvision")
    _zoo("timm")
    import torch

    from earlybird import ModelSpec, create_model

    # timm's ViT at 28x28 in patches of 4: 49 patches and the class token; --model-kwargs make it small
    vit = create_model(ModelSpec("timm:vit_tiny_patch16_224", 0, 1.0, 1, 10, 28,
                                 (("patch_size", 4), ("depth", 2), ("embed_dim", 48), ("num_heads", 2))))
    assert vit.pos_embed.shape == (1, 50, 48) and len(vit.blocks) == 2
    assert vit(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert create_model(ModelSpec("torchvision:vit_b_16", 0, 1.0, 3, 10, 32)).image_size == 32
    # a CNN takes any size and no such argument: it is built without it
    assert type(create_model(ModelSpec("timm:resnet18", 0, 1.0, 3, 10, 32))).__name__ == "ResNet"
    # an explicit one wins: here one the data does not have, which the model check says
    from earlybird.errors import ConfigError

    with pytest.raises(ConfigError, match="fails on 3x32x32 inputs .*doesn't match model \\(64\\)"):
        create_model(ModelSpec("timm:vit_tiny_patch16_224", 0, 1.0, 3, 10, 32, (("img_size", 64), ("depth", 1))))


def test_a_vits_weights_load_at_another_image_size_as_timm_resamples_them():
    _zoo("torchvision")
    _zoo("timm")
    import torch
    from timm.layers import resample_abs_pos_embed

    from earlybird import ModelSpec, create_model, load_pretrained

    small = (("depth", 1), ("embed_dim", 32), ("num_heads", 2))
    torch.manual_seed(0)
    pretrained = create_model(ModelSpec("timm:vit_tiny_patch16_224", 0, 1.0, 3, 10, 64, small))  # 4x4 patches
    model = create_model(ModelSpec("timm:vit_tiny_patch16_224", 0, 1.0, 3, 10, 32, small))  # 2x2
    done = load_pretrained(model, pretrained.state_dict())
    assert done.adapted == ["pos_embed (4x4 -> 2x2 patches)"] and not done.new
    expected = resample_abs_pos_embed(pretrained.pos_embed.detach(), [2, 2], num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected, atol=1e-6)
    assert torch.equal(model.patch_embed.proj.weight, pretrained.patch_embed.proj.weight)
