"""The reference's input options: frequency filters, input sparsification, GPU selection."""
import pytest
import torch

from earlybird.data import InputTransform
from earlybird.errors import ConfigError
from test_cli import assert_one_line_error, cli


def images():
    constant = torch.full((1, 1, 32, 32), 100.0)
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 200.0).view(1, 1, 32, 32)
    return constant, checker


def test_lowpass_keeps_a_constant_image_and_attenuates_a_checkerboard():
    constant, checker = images()
    low = InputTransform("lowpass", sigma=3.0)
    assert torch.allclose(low(constant), constant, atol=1e-3)
    out = low(checker)
    # the checkerboard's energy sits at the highest frequency: only its mean (100) survives
    assert (out - checker.mean()).abs().max() < 1e-3 * 200


def test_highpass_does_the_opposite():
    constant, checker = images()
    high = InputTransform("highpass", sigma=3.0)
    assert high(constant).abs().max() < 1e-3
    out = high(checker)
    assert torch.allclose(out, checker - checker.mean(), atol=0.5)


def test_filter_acts_on_every_channel_and_image_of_a_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 255
    low, high = InputTransform("lowpass", sigma=2.0), InputTransform("highpass", sigma=2.0)
    assert torch.allclose(low(x) + high(x), x, atol=1e-3)  # the two gains add up to one
    assert torch.allclose(low(x[2:3]), low(x)[2:3], atol=1e-4)


def test_sparsify_zeroes_exactly_the_pixels_at_or_below_the_threshold():
    x = torch.tensor([0.0, 25.0, 25.5, 26.0, 200.0]).view(1, 1, 1, 5)  # 25.5 is exactly 0.1 of 255
    out = InputTransform(sparsify_gt=0.1)(x)
    assert out.flatten().tolist() == [0.0, 0.0, 0.0, 26.0, 200.0]


@pytest.mark.parametrize("kwargs,match", [({"filter": "bandpass"}, "--filter"), ({"filter": "lowpass", "sigma": 0},
                                           "--sigma"), ({"sparsify_gt": 1.0}, "--sparsify-gt")])
def test_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        InputTransform(**kwargs)


@pytest.mark.parametrize("option", [["--filter", "lowpass", "--sigma", "4"], ["--filter", "highpass", "--sigma", "2"],
                                    ["--sparsity_gt", "0.2"]])
def test_search_with_each_option(capsys, tmp_path, cifar10_root, option):
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", "--arch",
                         "vgg11", "--width", "0.0625", "--batch-size", "16", "--epochs", "2", "--schedule", "1",
                         "--ratios", "0.5", "--full", *option, "--save", tmp_path / "s")
    assert code == 0, err
    assert (tmp_path / "s" / "checkpoint.pth").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize("ids", ["0", "0,1", "0,0", "x"])
def test_gpu_ids_without_a_gpu(capsys, tmp_path, ids):
    code, _, err = cli(capsys, "search", "--gpu_ids", ids, "--save", tmp_path / "s")
    assert_one_line_error(code, err, "--gpu-ids")
    assert not (tmp_path / "s").exists()
