"""ImageNet class folders of real JPEGs: decoding, the standard crops, determinism, end to end."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from earlybird.data import FolderLoader, dataset_info, load_dataset
from earlybird.errors import DataError
from test_cli import assert_one_line_error, cli


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for c, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (260, 300) if i % 2 else (240, 180)
                pixels = np.clip(rng.normal(60 + 70 * c, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    # a known picture for the validation crop: red left half, blue right half, 256 x 512
    half = np.zeros((256, 512, 3), np.uint8)
    half[:, :256, 0] = 255
    half[:, 256:, 2] = 255
    Image.fromarray(half).save(root / "val" / "n01440764" / "halves.JPEG", quality=95)
    return root


def test_reads_class_folders(imagenet_root):
    d = load_dataset("imagenet", imagenet_root)
    assert d.classes == ["n01440764", "n01443537", "n01484850"] and d.info.num_classes == 3
    assert dataset_info("imagenet", imagenet_root).num_classes == 3
    assert len(d.train.paths) == 12 and len(d.test.paths) == 7 and sorted(set(d.train.labels)) == [0, 1, 2]


def test_crops_and_determinism(imagenet_root):
    d = load_dataset("imagenet", imagenet_root)
    train = FolderLoader(d.train, 5, d.info, True, seed=3, workers=2)
    first = [x for x, _ in train]
    assert [tuple(x.shape) for x in first] == [(5, 3, 224, 224), (5, 3, 224, 224), (2, 3, 224, 224)]
    again = [x for x, _ in FolderLoader(d.train, 5, d.info, True, seed=3, workers=0)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # same crops whatever the worker count
    train.set_epoch(1)
    assert not torch.equal(next(iter(train))[0], first[0])
    # two workers: their parts of every global batch make up the one-process batch
    parts = [[x for x, _ in FolderLoader(d.train, 5, d.info, True, seed=3, workers=0, rank=r, world=2)]
             for r in range(2)]
    assert all(torch.equal(torch.cat([a, b]), x) for a, b, x in zip(*parts, first))
    # validation: resize the short side to 256, center crop 224 -> 112 red columns, then 112 blue
    val = FolderLoader(d.test, 16, d.info, False, workers=0)
    x, y = next(iter(val))
    k = d.test.paths.index(str(imagenet_root / "val" / "n01440764" / "halves.JPEG"))
    img = x[k] * torch.tensor(d.info.std).view(3, 1, 1) + torch.tensor(d.info.mean).view(3, 1, 1)
    assert y[k] == 0 and img[0, :, :110].mean() > 0.95 and img[2, :, 114:].mean() > 0.95
    assert img[2, :, :110].mean() < 0.05 and img[0, :, 114:].mean() < 0.05


@pytest.mark.parametrize("train, batch, rank, world", [(True, 5, 0, 1), (True, 5, 1, 2), (False, 3, 2, 3),
                                                     (False, 16, 1, 2)])
def test_a_folder_loaders_length_is_what_it_yields_and_costs_nothing(imagenet_root, monkeypatch, train, batch,
                                                                     rank, world):
    d = load_dataset("imagenet", imagenet_root)
    loader = FolderLoader(d.train if train else d.test, batch, d.info, train, workers=0, rank=rank, world=world)

    def walk(order):
        raise AssertionError("len() walked the index")  # 0.26 s a call on ImageNet, asked every few steps

    with monkeypatch.context() as m:
        m.setattr(loader, "_batches", walk)
        length = len(loader)
    # 7 validation images in batches of 3: the last holds one image, and rank 2 of 3 gets none of it
    assert length == sum(1 for _ in loader)


def test_missing_and_broken_images(tmp_path, imagenet_root):
    with pytest.raises(DataError, match="train/<wnid>"):
        load_dataset("imagenet", tmp_path)
    broken = tmp_path / "broken"
    (broken / "train" / "n0").mkdir(parents=True)
    (broken / "val" / "n0").mkdir(parents=True)
    (broken / "train" / "n0" / "a.JPEG").write_bytes(b"not a jpeg")
    (broken / "val" / "n0" / "b.JPEG").write_bytes(b"not a jpeg")
    d = load_dataset("imagenet", broken)
    with pytest.raises(DataError, match=r"a.JPEG is not a readable image.*replace it$"):
        next(iter(FolderLoader(d.train, 1, d.info, True, workers=1)))


def test_search_prune_eval_on_imagenet_folders(capsys, tmp_path, imagenet_root):
    save = tmp_path / "s"
    code, out, err = cli(capsys, "search", "--dataset", "imagenet", "--data", imagenet_root, "--arch", "resnet18",
                         "--width", "0.0625", "--epochs", 2, "--schedule", 1, "--batch-size", 6, "--ratios", 0.5,
                         "--workers", 1, "--full", "--save", save)
    assert code == 0, err
    assert "12 training images" in out and "(3x224x224 -> 3)" in out
    code, out, err = cli(capsys, "prune", "--model", save / "checkpoint.pth", "--data", imagenet_root, "--workers", 1,
                         "--latency-batches", "--save", tmp_path / "p")
    assert code == 0, err
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["max_output_diff_pruned_vs_masked"] < 1e-4
    code, out, err = cli(capsys, "eval", "--model", tmp_path / "p" / "pruned.pth", "--data", imagenet_root)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["test_images"] == 7
    code, _, err = cli(capsys, "eval", "--model", tmp_path / "p" / "pruned.pth", "--data", tmp_path / "nothing")
    assert_one_line_error(code, err, "no ImageNet class folders", "--data")


def test_a_decompression_bomb_says_which_file_and_how_to_allow_it(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb"
    for split in ("train", "val"):
        (bomb / split / "n0").mkdir(parents=True)
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(bomb / split / "n0" / "big.JPEG")
    d = load_dataset("imagenet", bomb)
    # a limit of 1,000 pixels makes this 4,096-pixel image a "bomb" (over twice the limit) in the
    # worker process too: the variable is what a user sets
    monkeypatch.setenv("EARLYBIRD_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(DataError, match=r"big.JPEG is too large to decode safely.*EARLYBIRD_MAX_IMAGE_PIXELS=<pixels>"):
        next(iter(FolderLoader(d.train, 1, d.info, True, workers=1)))
    monkeypatch.setenv("EARLYBIRD_MAX_IMAGE_PIXELS", "100000")  # trusted: allowed
    x, y = next(iter(FolderLoader(d.train, 1, d.info, True, workers=1)))
    assert x.shape == (1, 3, 224, 224)
