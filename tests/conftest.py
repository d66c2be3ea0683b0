"""Fixtures: tiny datasets written in the exact official file formats, and small models."""
from __future__ import annotations

import gzip
import pickle
import struct
import sys
import types

import numpy as np
import pytest
import torch

from earlybird.models import ModelSpec, create_model

if torch.version.cuda is None:
    # torchvision's wheel here is a CUDA build: on the CPU torch its operator registrations fail, and
    # it is imported by timm, torchmetrics (under Lightning) and the zoo tests, none of which needs
    # them. Stubbed before any test imports it, in whichever order the workers run the tests.
    for _module in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(_module, types.ModuleType(_module))


def write_cifar(root, name="cifar10", per_batch=16, test=16, seed=0):
    """CIFAR python-pickle files as the official archives hold them (bytes keys, uint8 N x 3072)."""
    rng = np.random.default_rng(seed)
    folder, train_files, label_key, classes = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], b"labels", 10),
        "cifar100": ("cifar-100-python", ["train"], b"fine_labels", 100),
    }[name]
    base = root / folder
    base.mkdir(parents=True, exist_ok=True)
    for fname, n in [(f, per_batch) for f in train_files] + [("test_batch" if name == "cifar10" else "test", test)]:
        labels = rng.integers(0, classes, n)
        # Class-dependent brightness so a network can actually learn something in a few steps.
        data = np.clip(rng.normal(40 + labels[:, None] * (200 // classes), 30, (n, 3072)), 0, 255).astype(np.uint8)
        batch = {b"batch_label": fname.encode(), label_key: labels.tolist(), b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        if name == "cifar100":
            batch[b"coarse_labels"] = (labels // 5).tolist()
        with open(base / fname, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return root


def write_idx(path, array: np.ndarray):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root, train=64, test=32, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, n)
        images = np.clip(rng.normal(20 + labels[:, None, None] * 20, 30, (n, 28, 28)), 0, 255)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar100"), "cifar100", per_batch=40)


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


def randomize_bn(model, seed=0):
    """Give every BN random scales, shifts and statistics, as a trained network has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


@pytest.fixture
def small_vgg():
    torch.manual_seed(0)
    return randomize_bn(create_model(ModelSpec("vgg", 11, 0.125, 3, 10, 32))).eval()


@pytest.fixture(autouse=True)
def _device_named(request, monkeypatch):
    """Every test names its device. Under --device auto a GPU machine would run a test written for
    the CPU (the fused kernel, gloo workers) on its GPU, and the suite would fail there; tests marked
    ``cuda`` are the GPU's own."""
    if request.node.get_closest_marker("cuda"):
        return
    from earlybird.stages import common

    real = common.resolve_device

    def named(name):
        if name == "auto":
            pytest.fail("this test runs earlybird with --device auto: pass --device cpu, or mark it cuda")
        return real(name)

    monkeypatch.setattr(common, "resolve_device", named)


@pytest.fixture(autouse=True)
def _own_speed_cache(tmp_path_factory, monkeypatch):
    """Each test starts with no remembered speed choices and leaves none in the user's cache."""
    monkeypatch.setenv("EARLYBIRD_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
