import gzip
import hashlib
import pickle
import tarfile

import numpy as np
import pytest
import torch

from conftest import write_cifar, write_idx
from earlybird import ConfigError, DataError
from earlybird.data import BatchLoader, dataset_info, load_dataset
from earlybird.data import cifar, fashion_mnist


def test_cifar10_reader(cifar10_root):
    d = load_dataset("cifar10", cifar10_root, download=False)
    assert d.train_images.shape == (80, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (16, 3, 32, 32)
    assert d.train_labels.dtype == torch.int64 and int(d.train_labels.max()) < 10
    # channel-major layout: the first 1024 bytes of a row are the red plane
    with open(cifar10_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(d.train_images[0, 0].flatten(), torch.from_numpy(raw[b"data"][0, :1024]))
    assert d.train_labels[:16].tolist() == raw[b"labels"]


def test_cifar100_reader_uses_fine_labels(cifar100_root):
    d = load_dataset("cifar100", cifar100_root, download=False)
    with open(cifar100_root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert d.train_labels.tolist() == raw[b"fine_labels"]
    assert d.info.num_classes == 100


def test_fashion_mnist_reader(fmnist_root):
    d = load_dataset("fashion-mnist", fmnist_root, download=False)
    assert d.train_images.shape == (64, 1, 28, 28) and d.test_images.shape == (32, 1, 28, 28)
    assert d.info.in_channels == 1 and d.info.image_size == 28


def test_truncated_idx_file_is_reported(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix, n in (("train", 10), ("t10k", 5)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(n))
    raw = gzip.open(folder / "train-images-idx3-ubyte.gz").read()
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_an_idx_file_cut_inside_its_header_is_reported(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(b"\0\0\x08\x03\0\0\0\x0a\0\0")  # three dimensions declared, one and a half given
    with pytest.raises(DataError, match="ends inside its header.*truncated"):
        fashion_mnist.read_idx(path)


def test_a_folder_missing_one_file_names_it_without_waiting_on_the_network(tmp_path, monkeypatch):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix, n in (("train", 10), ("t10k", 5)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(n))
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"lacks t10k-labels-idx1-ubyte.gz of Fashion-MNIST's four files"):
        load_dataset("fashion-mnist", tmp_path, download=False)
    fetched = []  # with downloads on, only the missing file is fetched, into that folder

    def fake_download(url, dest, md5, hint):
        fetched.append(dest)
        write_idx(dest, np.zeros(5))
        return dest

    monkeypatch.setattr(fashion_mnist, "download", fake_download)
    d = load_dataset("fashion-mnist", tmp_path, download=True)
    assert fetched == [folder / "t10k-labels-idx1-ubyte.gz"] and d.test_labels.shape == (5,)


def test_missing_data_without_download_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="put the four"):
        load_dataset("fashion-mnist", tmp_path, download=False)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path, download=False)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(cifar._ARCHIVES, "cifar10", ((tmp_path / "absent.tar.gz").as_uri(), "0" * 32))
    with pytest.raises(DataError, match="could not download .* put the extracted"):
        load_dataset("cifar10", tmp_path / "data")


def _archive(tmp_path, root):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_checks_the_checksum_and_extracts(tmp_path, monkeypatch, cifar10_root):
    archive, md5 = _archive(tmp_path, cifar10_root)
    monkeypatch.setitem(cifar._ARCHIVES, "cifar10", (archive.as_uri(), "f" * 32))
    with pytest.raises(DataError, match="MD5"):
        load_dataset("cifar10", tmp_path / "bad")
    assert not list((tmp_path / "bad").glob("*.tar.gz"))  # no half-verified file left behind
    monkeypatch.setitem(cifar._ARCHIVES, "cifar10", (archive.as_uri(), md5))
    d = load_dataset("cifar10", tmp_path / "good")
    assert d.train_images.shape == (80, 3, 32, 32)


def test_foreign_pickle_cannot_run_code(tmp_path):
    root = write_cifar(tmp_path)
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": __import__("os").getcwd, b"labels": []}, f)
    with pytest.raises(DataError, match="not a readable CIFAR batch"):
        load_dataset("cifar10", root, download=False)


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="unknown dataset 'mnist2'"):
        dataset_info("mnist2")


def test_train_subset_is_seeded(cifar10_root):
    a = load_dataset("cifar10", cifar10_root, download=False, train_subset=20, seed=3)
    b = load_dataset("cifar10", cifar10_root, download=False, train_subset=20, seed=3)
    assert len(a.train_images) == 20 and torch.equal(a.train_labels, b.train_labels)


def test_loader_augments_and_normalizes(cifar10_root):
    d = load_dataset("cifar10", cifar10_root, download=False)
    train = BatchLoader(d.train_images, d.train_labels, 32, d.info, train=True, seed=1)
    test = BatchLoader(d.test_images, d.test_labels, 32, d.info, train=False)
    batches = list(train)
    assert len(batches) == len(train) == 3
    assert sum(len(y) for _, y in batches) == 80
    x, _ = batches[0]
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
    # every test image comes out un-augmented, in order, normalized
    (xt, yt), = list(test)
    mean = torch.tensor(d.info.mean).view(1, 3, 1, 1)
    std = torch.tensor(d.info.std).view(1, 3, 1, 1)
    assert torch.allclose(xt, (d.test_images.float() / 255 - mean) / std, atol=1e-5)
    assert torch.equal(yt, d.test_labels)
    # same (seed, epoch) -> same batches; another epoch -> another order
    train.set_epoch(0)
    again = [y for _, y in train]
    assert all(torch.equal(a, b[1]) for a, b in zip(again, batches))
    train.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip([y for _, y in train], again))


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    info = dataset_info("cifar10")
    img = torch.arange(3 * 32 * 32, dtype=torch.float).view(1, 3, 32, 32).repeat(64, 1, 1, 1) % 251 + 1
    loader = BatchLoader(img.to(torch.uint8), torch.zeros(64, dtype=torch.long), 64, info, train=True)
    out = loader._augment(img.to(torch.uint8), torch.Generator().manual_seed(0), 64, slice(0, 64)).float()
    padded = torch.nn.functional.pad(img[0], (4, 4, 4, 4))
    for k in range(64):
        candidates = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(out[k], c) for c in candidates)


def test_workers_split_each_global_batch_with_the_one_process_augmentation():
    """Two workers' parts of every batch are exactly the one-process batch, augmentation included."""
    info = dataset_info("cifar10")
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (37, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(37)
    for train in (True, False):
        one = list(BatchLoader(images, labels, 8, info, train, seed=4))
        parts = [list(BatchLoader(images, labels, 8, info, train, seed=4, rank=r, world=2)) for r in range(2)]
        if train:  # the last global batch (5 images) still splits 3 / 2; a batch of 1 would be left out
            assert len(parts[0]) == len(parts[1]) == len(one) == 5
        for (x, y), (x0, y0), (x1, y1) in zip(one, *parts):
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert len(BatchLoader(images[:33], labels[:33], 8, info, True, rank=1, world=2)) == 4


def test_crop_and_flip_follow_the_standard_distribution():
    """The batched crop/flip draws what RandomCrop(32, padding=4) + RandomHorizontalFlip draw: every
    one of the 9 x 9 offsets and both flips equally often (chi-square test over recovered draws)."""
    info = dataset_info("cifar10")
    n = 8100
    img = (torch.arange(32 * 32).view(1, 1, 32, 32) % 251 + 1).to(torch.uint8).expand(n, 3, 32, 32)
    loader = BatchLoader(img, torch.zeros(n, dtype=torch.long), 4050, info, train=True, seed=2)
    out = torch.cat([x for x, _ in loader])
    out = ((out * torch.tensor(info.std).view(1, 3, 1, 1) + torch.tensor(info.mean).view(1, 3, 1, 1)) * 255).round()
    padded = torch.nn.functional.pad(img[0, 0].float(), (4, 4, 4, 4))
    windows = torch.stack([padded[dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)])
    windows = torch.cat([windows, windows.flip(2)])  # 162 cells: offset x flip
    cells = torch.cdist(out[:, 0].flatten(1), windows.flatten(1)).argmin(1)
    counts = torch.bincount(cells, minlength=162).float()
    expected = n / 162
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert counts.min() > 0 and chi2 < 230  # 161 degrees of freedom: p > 0.0003
