"""One's own images: class folders and Hugging Face datasets, at their own size, end to end."""
import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from earlybird import data as data_module
from earlybird.data.decode import to_mode
from earlybird.errors import ConfigError, DataError
from earlybird.export import read_metadata
from earlybird.progress import Reporter
from earlybird.train import load_checkpoint
from test_cli import TINY, assert_one_line_error, cli

RUN = ["--device", "cpu", "--workers", "1"]  # cli() adds --cpu-kernels off where a command has it


def picture(label: int, size, mode: str, rng) -> Image.Image:
    """A class-dependent image (brightness by class) in ``mode``."""
    w, h = size
    rgb = np.clip(rng.normal(50 + 70 * label, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":  # 16-bit grayscale, as scanners and microscopes write it
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    return img.convert(mode) if mode != "RGB" else img


def write_folder(root, per_class=(10, 3), classes=("cat", "dog", "emu"), sizes=((32, 32),), modes=("RGB",),
                 formats=("png",), seed=0, val=True):
    """train/<class>/ (and val/<class>/) of images cycling through ``sizes``, ``modes`` and ``formats``."""
    rng = np.random.default_rng(seed)
    k = 0
    for split, n in zip(("train", "val") if val else ("train",), per_class):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                mode, fmt, size = modes[k % len(modes)], formats[k % len(formats)], sizes[k % len(sizes)]
                img = picture(label, size, mode, rng)
                if fmt == "jpg" and img.mode not in ("RGB", "L"):
                    img = img.convert("RGB")
                img.save(folder / f"{i}.{fmt}")
                k += 1
    return root


def _flow(capsys, tmp_path, source):
    """search -> prune -> retrain -> eval -> export, the later stages naming no dataset."""
    run = tmp_path / "run"
    code, out, err = cli(capsys, "search", *source, *TINY, "--epochs", 2, "--ratios", 0.5, "--save", run, *RUN)
    assert code == 0, err
    code, pout, err = cli(capsys, "prune", "--model", run / "checkpoint.pth", "--percent", 0.5, "--device", "cpu")
    assert code == 0, err
    pruned = run / "pruned-50" / "pruned.pth"
    code, _, err = cli(capsys, "retrain", "--model", pruned, "--epochs", 3, "--batch-size", 16, "--device", "cpu")
    assert code == 0, err
    best = run / "pruned-50" / "retrain" / "model_best.pth"
    code, eout, err = cli(capsys, "eval", "--model", best, "--device", "cpu")
    assert code == 0, err
    code, _, err = cli(capsys, "export", "--model", best, "--format", "onnx")
    assert code == 0, err
    return out, pout, eout, load_checkpoint(best), read_metadata(best.with_suffix(".onnx"), "onnx")


def test_a_class_folder_of_small_mixed_images_goes_the_whole_way_at_its_own_size(capsys, tmp_path):
    root = write_folder(tmp_path / "pets", sizes=((32, 32), (32, 32), (30, 34), (33, 31)),
                        modes=("RGB", "L", "RGBA", "P", "I;16"), formats=("png", "jpg"))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    out, pout, eout, best, meta = _flow(capsys, tmp_path, ["--dataset", "folder", "--data", root])
    assert "folder: skipped 1 non-image file (e.g. train/cat/notes.txt)" in out
    assert "folder: 3 classes, 30 training and 9 test images at 32x32, 3 channels" in out and "held in memory" in out
    assert "vgg11 width 0.0625 (3x32x32 -> 3)" in out  # its own size, not ImageNet's 224
    assert "folder test (9 images)" in eout
    info = best["data_info"]
    assert best["dataset"] == "folder" and info["classes"] == ["cat", "dog", "emu"] and info["image_size"] == 32
    assert meta["classes"] == ["cat", "dog", "emu"] and meta["mean"] == info["mean"] and meta["input_shape"] == [3, 32, 32]


def test_a_hugging_face_dataset_saved_to_disk_goes_the_whole_way(capsys, tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)

    def split(n):
        labels = [i % 3 for i in range(n)]
        return datasets.Dataset.from_dict(
            {"photo": [picture(y, (28, 28), "L", rng) for y in labels], "kind": labels, "note": ["x"] * n},
            features=datasets.Features({"photo": datasets.Image(), "note": datasets.Value("string"),
                                        "kind": datasets.ClassLabel(names=["a", "b", "c"])}))

    datasets.DatasetDict({"train": split(30), "validation": split(9)}).save_to_disk(str(tmp_path / "hfds"))
    out, _, eout, best, meta = _flow(capsys, tmp_path, ["--dataset", f"hf:{tmp_path / 'hfds'}"])
    assert f"hf:{tmp_path / 'hfds'}: 3 classes, 30 training and 9 test images at 28x28, 1 channel" in out
    assert "(1x28x28 -> 3)" in out and "test (9 images)" in eout
    assert best["data_info"]["columns"] == ["photo", "kind"] and meta["classes"] == ["a", "b", "c"]
    assert meta["channels"] == "grayscale"

    # no column of the kind earlybird looks for: the columns are listed
    datasets.Dataset.from_dict({"pixels": [[1, 2]], "label": [0]}).save_to_disk(str(tmp_path / "bare"))
    capsys.readouterr()  # the datasets library's own progress bar
    code, _, err = cli(capsys, "search", "--dataset", f"hf:{tmp_path / 'bare'}", *TINY, *RUN)
    assert_one_line_error(code, err, "has no Image column (columns: pixels (", "--image-column")


def test_a_hugging_face_dataset_with_one_split_holds_out_part_and_one_without_labels_is_refused(capsys, tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    labels = [i % 2 for i in range(20)]
    images = [picture(y, (16, 16), "RGB", rng) for y in labels]
    datasets.Dataset.from_dict({"image": images, "y": labels}, features=datasets.Features(
        {"image": datasets.Image(), "y": datasets.Value("int64")})).save_to_disk(str(tmp_path / "one"))
    lines = io.StringIO()
    train, test, info = data_module.hf(str(tmp_path / "one"), batch_size=64, reporter=Reporter(bars=False, out=lines),
                                       label_column="y", workers=0)
    assert info.classes == ("0", "1") and info.held_out == 0.1 and train.num_samples == 18
    assert torch.cat([y for _, y in test]).tolist() == [0, 1]  # one of each class held out
    assert "no validation or test split: 2 training rows" in lines.getvalue()
    named = ["dog" if y else "cat" for y in labels]  # labels as strings: classes by name
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images, "kind": named}, features=datasets.Features(
        {"image": datasets.Image(), "kind": datasets.Value("string")})), "test": datasets.Dataset.from_dict(
        {"image": images[:2], "kind": ["cat", "yak"]}, features=datasets.Features(
            {"image": datasets.Image(), "kind": datasets.Value("string")}))}).save_to_disk(str(tmp_path / "named"))
    with pytest.raises(DataError, match=r"named\[test\] has the label 'yak', which the training split"):
        data_module.hf(str(tmp_path / "named"), label_column="kind", workers=0)
    datasets.Dataset.from_dict({"image": images[:2]}, features=datasets.Features(
        {"image": datasets.Image()})).save_to_disk(str(tmp_path / "unlabelled"))
    capsys.readouterr()
    code, _, err = cli(capsys, "search", "--dataset", f"hf:{tmp_path / 'unlabelled'}", *TINY, *RUN)
    assert_one_line_error(code, err, "has no ClassLabel column (columns: image (Image))", "--label-column")


def test_the_next_run_reads_the_decoded_images_and_a_changed_folder_is_decoded_again(tmp_path):
    root = write_folder(tmp_path / "f")
    lines = io.StringIO()
    reporter = Reporter(bars=False, out=lines)
    train, test, info = data_module.folder(root, batch_size=8, reporter=reporter, workers=1)
    assert "decoded 39 images" in lines.getvalue() and "kept in" in lines.getvalue()
    first = next(iter(test))[0]
    lines.truncate(0)
    _, test2, _ = data_module.folder(root, batch_size=8, reporter=reporter, workers=1)
    assert "decoded images read from" in lines.getvalue() and torch.equal(next(iter(test2))[0], first)
    picture(0, (32, 32), "RGB", np.random.default_rng(9)).save(root / "val" / "cat" / "0.png")  # a changed file
    lines.truncate(0)
    data_module.folder(root, batch_size=8, reporter=reporter, workers=1)
    assert "decoded 39 images" in lines.getvalue()
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    lines.truncate(0)  # --train-subset: other images, another cache file
    subset = data_module.load_dataset("folder", root, train_subset=5, images=data_module.ImageOptions(workers=0),
                                      reporter=reporter)
    assert len(subset.train_images) == 5 and "decoded 14 images" in lines.getvalue()


def test_image_modes_become_the_datasets_channels():
    sixteen = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    assert np.asarray(to_mode(sixteen, 1)).tolist() == [[0, 1, 255]]  # scaled, not clipped at 255
    rgba = Image.new("RGBA", (2, 1), (200, 100, 50, 0))
    rgba.putpixel((1, 0), (200, 100, 50, 255))
    assert np.asarray(to_mode(rgba, 3)).tolist() == [[[0, 0, 0], [200, 100, 50]]]  # transparent: black
    palette = Image.new("P", (1, 1))
    palette.putpalette([10, 20, 30] * 256)
    assert to_mode(palette, 3).getpixel((0, 0)) == (10, 20, 30)
    assert to_mode(Image.new("RGB", (1, 1), (30, 60, 90)), 1).mode == "L"


def test_grayscale_folders_train_in_one_channel_and_large_images_get_random_resized_crops(tmp_path):
    gray = write_folder(tmp_path / "gray", modes=("L", "I;16"), per_class=(4, 2))
    _, _, info = data_module.folder(gray, batch_size=4, workers=0)
    assert info.in_channels == 1 and not info.resized_crop and info.crop_padding == 4

    large = write_folder(tmp_path / "large", sizes=((200, 170), (180, 240)), per_class=(4, 2), formats=("jpg",))
    train, test, info = data_module.folder(large, batch_size=12, image_size=32, workers=0)
    assert info.resized_crop and info.crop_padding == 0 and info.image_size == 32
    batches = []
    for epoch in (0, 1):
        train.set_epoch(epoch)
        batches.append(next(iter(train))[0])
    assert batches[0].shape == (12, 3, 32, 32) and not torch.equal(batches[0], batches[1])
    assert torch.equal(next(iter(test))[0], next(iter(test))[0])  # evaluation: the central crop, every time


def test_without_val_a_fixed_stratified_part_is_held_out_whatever_the_seed(tmp_path):
    root = write_folder(tmp_path / "f", per_class=(10,), val=False)
    lines = io.StringIO()
    splits = []
    for seed in (0, 5):
        _, test, info = data_module.folder(root, batch_size=64, seed=seed, reporter=Reporter(bars=False, out=lines),
                                           workers=0)
        splits.append(torch.cat([y for _, y in test]))
    assert torch.equal(splits[0], splits[1]) and splits[0].bincount().tolist() == [1, 1, 1]
    assert info.held_out == 0.1 and "no val/ folder: 3 of the training images (0.1 of each class" in lines.getvalue()


def test_streaming_through_the_workers_keeps_the_images_own_size(capsys, tmp_path):
    root = write_folder(tmp_path / "f", sizes=((24, 24),), per_class=(6, 2))
    code, out, err = cli(capsys, "search", "--dataset", "folder", "--data", root, *TINY, "--epochs", 1, "--ratios", 0.5,
                         "--cache", "off", "--save", tmp_path / "run", *RUN)
    assert code == 0, err
    assert "streamed through the decoding workers (--cache off)" in out and "(3x24x24 -> 3)" in out
    # streamed or held, small images are evaluated alike, and trained on shifted crops at their size
    streamed, held = (data_module.folder(root, batch_size=18, cache=cache, workers=0) for cache in ("off", "on"))
    assert torch.equal(next(iter(streamed[1]))[0], next(iter(held[1]))[0])
    x = next(iter(streamed[0]))[0]
    assert x.shape == (18, 3, 24, 24) and not torch.equal(x, next(iter(held[0]))[0])


def test_images_of_wildly_different_sizes_say_what_was_done(capsys, tmp_path):
    root = write_folder(tmp_path / "f", sizes=((20, 20), (32, 32), (64, 48)), per_class=(3, 1))
    lines = io.StringIO()
    data_module.folder(root, batch_size=4, reporter=Reporter(bars=False, out=lines), workers=0)
    assert ("images from 20x20 to 64x48 px (sampled): each is resized to 32 px on its shorter side and "
            "center-cropped to 32x32") in lines.getvalue()


def _bad(tmp_path, case):
    root = write_folder(tmp_path / "f", per_class=(3, 1))
    if case == "no train":
        (root / "train").rename(root / "training")
    elif case == "one class":
        for name in ("dog", "emu"):
            for f in (root / "train" / name).iterdir():
                f.unlink()
            (root / "train" / name).rmdir()
    elif case == "empty class":
        for f in (root / "train" / "emu").iterdir():
            f.unlink()
        (root / "train" / "emu" / "readme.md").write_text("soon")
    elif case == "val only class":
        (root / "val" / "yak").mkdir()
        picture(0, (32, 32), "RGB", np.random.default_rng(0)).save(root / "val" / "yak" / "0.png")
    elif case == "corrupt image":
        (root / "train" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


@pytest.mark.parametrize("case, needles", [
    ("no train", ["has no train/ folder", "train/<class>/"]),
    ("one class", ["has one class folder (cat)", "two or more classes"]),
    ("empty class", ["class folder", "emu holds no images (1 other files)"]),
    ("val only class", ["has classes that", "lacks (yak)"]),
    ("corrupt image", ["dog/1.png is not a readable image", "delete or replace it"]),
])
def test_bad_folders_are_one_line(capsys, tmp_path, case, needles):
    root = _bad(tmp_path, case)
    code, _, err = cli(capsys, "search", "--dataset", "folder", "--data", root, *TINY, "--epochs", 1,
                       "--save", tmp_path / "run", *RUN)
    assert_one_line_error(code, err, *needles)


def test_bad_image_flags_are_one_line(capsys, tmp_path):
    root = write_folder(tmp_path / "f", per_class=(3, 1))
    for flags, needle in ((["--mean", "0.5", "--std", "0.2"], "--mean and --std give 1 values; the images have 3"),
                          (["--mean", "0.5"], "--mean and --std go together"),
                          (["--val-fraction", "1.5"], "--val-fraction 1.5 must be in (0, 1)"),
                          (["--image-size", "4"], "--image-size 4 must be in 8..1024")):
        code, _, err = cli(capsys, "search", "--dataset", "folder", "--data", root, *TINY, "--epochs", 1,
                           "--save", tmp_path / "run", *RUN, *flags)
        assert_one_line_error(code, err, needle)
    code, _, err = cli(capsys, "eval", "--model", tmp_path / "none.pth", "--dataset", "folder", *RUN)
    assert code == 2


def test_a_checkpoint_of_one_folder_refuses_a_folder_of_other_classes(capsys, tmp_path):
    root = write_folder(tmp_path / "f", per_class=(3, 1))
    code, _, err = cli(capsys, "search", "--dataset", "folder", "--data", root, *TINY, "--epochs", 1, "--ratios", 0.5,
                       "--save", tmp_path / "run", *RUN)
    assert code == 0, err
    other = write_folder(tmp_path / "g", per_class=(3, 1), classes=("ant", "bee", "cow"))
    code, _, err = cli(capsys, "eval", "--model", tmp_path / "run" / "checkpoint.pth", "--data", other, "--device", "cpu")
    assert_one_line_error(code, err, "has the classes ant, bee, cow; the checkpoint was trained on cat, dog, emu")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"] == "folder"


def test_the_documented_python_example_runs(tmp_path):
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "own-images.md").read_text()
    code = re.search(r"<!-- own-images-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    root = write_folder(tmp_path / "photos", per_class=(4, 2))
    code = code.replace('"photos"', repr(str(root))).replace('device="cuda"', 'device="cpu", workers=0')
    scope = {"epochs": 1}
    exec(compile(code, "docs/own-images.md", "exec"), scope)
    assert scope["model"](scope["x"]).shape == (12, 3) and scope["info"].classes == ("cat", "dog", "emu")


def test_auto_holds_in_memory_what_fits_a_quarter_of_the_free_memory_and_streams_the_rest(tmp_path, monkeypatch):
    from earlybird.data import images as images_module

    root = write_folder(tmp_path / "f", per_class=(4, 2))  # 18 images of 3 x 32 x 32: 55,296 bytes decoded
    for free, kind in ((4 * 55_296, data_module.Dataset), (4 * 55_296 - 4, data_module.FolderDataset)):
        monkeypatch.setattr(images_module, "available_memory", lambda device, free=free: free)
        lines = io.StringIO()
        got = data_module.load_dataset("folder", root, images=data_module.ImageOptions(workers=0),
                                       reporter=Reporter(bars=False, out=lines))
        assert type(got) is kind, lines.getvalue()
    assert "streamed through the decoding workers (54.0 KiB decoded, over a quarter of the free memory" in lines.getvalue()


def test_the_image_column_and_the_normalization_can_be_named(capsys, tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(2)
    labels = [i % 2 for i in range(12)]
    features = datasets.Features({"thumb": datasets.Image(), "photo": datasets.Image(),
                                  "y": datasets.ClassLabel(names=["no", "yes"])})
    datasets.Dataset.from_dict({"thumb": [picture(y, (8, 8), "L", rng) for y in labels],
                                "photo": [picture(y, (20, 20), "RGB", rng) for y in labels], "y": labels},
                               features=features).save_to_disk(str(tmp_path / "two"))
    capsys.readouterr()
    code, out, err = cli(capsys, "search", "--dataset", f"hf:{tmp_path / 'two'}", "--image-column", "photo",
                         "--mean", 0.5, 0.4, 0.3, "--std", 0.2, 0.2, 0.2, *TINY, "--epochs", 1, "--ratios", 0.5,
                         "--save", tmp_path / "run", *RUN)
    assert code == 0, err
    info = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["data_info"]
    assert info["columns"] == ["photo", "y"] and info["image_size"] == 20 and info["in_channels"] == 3
    assert info["mean"] == [0.5, 0.4, 0.3] and info["std"] == [0.2, 0.2, 0.2]
    code, _, err = cli(capsys, "search", "--dataset", f"hf:{tmp_path / 'two'}", "--image-column", "picture", *TINY,
                       "--save", tmp_path / "other", *RUN)
    assert_one_line_error(code, err, "has no column 'picture' (columns: thumb (Image), photo (Image), y (ClassLabel))",
                          "fix --image-column")


def test_the_readme_s_home_folder_path_is_expanded(tmp_path, monkeypatch):
    # README.md: earlybird.data.folder("~/photos", ...)
    monkeypatch.setenv("HOME", str(tmp_path))
    write_folder(tmp_path / "photos", per_class=(4, 2))
    train, test, info = data_module.folder("~/photos", batch_size=6, workers=0)
    assert info.classes == ("cat", "dog", "emu") and next(iter(train))[0].shape[0] == 6


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_decoded_image_cache_that_cannot_be_read_is_decoded_again_in_one_line(tmp_path, damage):
    from earlybird.data import images as images_module

    root = write_folder(tmp_path / "f", per_class=(4, 2))
    lines = io.StringIO()
    reporter = Reporter(bars=False, out=lines)
    first = data_module.folder(root, batch_size=6, reporter=reporter, workers=0)[1]
    path = Path(re.search(r"kept in (\S+\.pt) for the next run", lines.getvalue()).group(1))
    data = path.read_bytes()
    path.write_bytes(b"a line of text\n" if damage == "garbage" else data[:len(data) // 2])
    lines.truncate(0)
    lines.seek(0)
    again = data_module.folder(root, batch_size=6, reporter=reporter, workers=0)[1]
    said = [line for line in lines.getvalue().splitlines() if "could not be read" in line]
    assert len(said) == 1 and f"the decoded images in {path} could not be read (" in said[0], lines.getvalue()
    assert "decoding them again" in said[0] and "kept in" in said[0]
    assert torch.equal(next(iter(again))[0], next(iter(first))[0])
    assert torch.load(path, weights_only=True)["train"].shape[0] == 12  # the bad file replaced
    assert images_module.cache_cap() == 20 * 2**30  # the default cap


def test_the_decoded_image_caches_stay_under_their_cap(tmp_path, monkeypatch):
    from earlybird.data import images as images_module

    lines = io.StringIO()
    reporter = Reporter(bars=False, out=lines)
    first = write_folder(tmp_path / "a", per_class=(4, 2))
    data_module.folder(first, batch_size=6, reporter=reporter, workers=0)
    old = Path(re.search(r"kept in (\S+\.pt)", lines.getvalue()).group(1))
    monkeypatch.setenv(images_module.CACHE_MAX, str(old.stat().st_size + 100))  # room for about one
    lines.truncate(0)
    lines.seek(0)
    second = write_folder(tmp_path / "b", per_class=(5, 2))
    data_module.folder(second, batch_size=6, reporter=reporter, workers=0)
    new = Path(re.search(r"kept in (\S+\.pt)", lines.getvalue()).group(1))
    assert new.is_file() and not old.exists()
    assert "dropped 1 less recently used decoded-image cache file (" in lines.getvalue()
    assert f"to stay under {images_module.CACHE_MAX}=" in lines.getvalue()
    monkeypatch.setenv(images_module.CACHE_MAX, "lots")
    with pytest.raises(ConfigError, match="EARLYBIRD_IMAGE_CACHE_MAX=lots: give a size such as 20G or 500M"):
        images_module.cache_cap()


def _in_the_hub_cache(datasets, cache: Path, repo: str, table) -> None:
    """``table`` as the datasets library caches a Hub dataset ``repo`` it downloaded: prepared Arrow
    files under <cache>/<namespace>___<name>/<config>/<version>/<hash>/ (written here by its own
    parquet builder, then named as a download of ``repo`` is)."""
    table.to_parquet(str(cache / "src" / "train.parquet"))
    datasets.load_dataset("parquet", data_files={"train": str(cache / "src" / "train.parquet")},
                          cache_dir=str(cache / "build"))
    namespace, name = repo.split("/")
    (config,) = (cache / "build" / "parquet").iterdir()
    target = cache / f"{namespace}___{name}" / "default"
    target.parent.mkdir()
    config.rename(target)
    for arrow in target.rglob("parquet-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("parquet-", f"{name}-")))


def test_a_hub_name_is_read_from_the_local_cache_without_a_request(capsys, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    hf = sys.modules["earlybird.data.hf"]
    rng = np.random.default_rng(2)
    labels = [i % 2 for i in range(24)]
    (tmp_path / "src").mkdir()
    _in_the_hub_cache(datasets, tmp_path, "someone/shapes", datasets.Dataset.from_dict(
        {"image": [picture(y, (16, 16), "RGB", rng) for y in labels], "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    monkeypatch.setattr(hf, "_reachable", lambda url: pytest.fail("the cache holds it: no request is needed"))
    capsys.readouterr()
    code, out, err = cli(capsys, "search", "--dataset", "hf:someone/shapes", *TINY, "--epochs", 1, "--ratios", 0.5,
                         "--save", tmp_path / "run", *RUN)
    assert code == 0, err
    assert "hf:someone/shapes: 2 classes, 22 training and 2 test images at 16x16" in out
    assert "cached version" not in out + err  # the library's notes stay out of earlybird's output


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_name_missing_from_the_cache_offline_is_one_line_at_once(capsys, tmp_path, monkeypatch, offline):
    datasets = pytest.importorskip("datasets")
    hf = sys.modules["earlybird.data.hf"]
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "_reachable", lambda url: False)  # a machine without network
    start = time.perf_counter()
    code, _, err = cli(capsys, "search", "--dataset", "hf:someone/not-cached", *TINY, "--save", tmp_path / "run", *RUN)
    # the Hub client's retries (1+2+4+8+8 s) are what this must not wait for
    assert time.perf_counter() - start < 5
    assert_one_line_error(code, err, "hf:someone/not-cached is neither a folder nor a dataset in the local Hugging "
                          "Face cache", "HF_HUB_OFFLINE is set" if offline else "cannot be reached", "save_to_disk")


def test_each_command_scans_a_folder_once(capsys, tmp_path, monkeypatch):
    write_folder(tmp_path / "imgs")
    scans = []
    scan = data_module.scan_folder
    monkeypatch.setattr(data_module, "scan_folder", lambda *a, **k: scans.append(a) or scan(*a, **k))
    source = ["--dataset", "folder", "--data", tmp_path / "imgs"]
    out, pout, eout, *_ = _flow(capsys, tmp_path, source)  # search, prune, retrain, eval (export reads no data)
    assert len(scans) == 4
    code, _, err = cli(capsys, "run", *source, *TINY, "--epochs", 4, "--ratios", 0.5, "--eb-threshold", 0.9,
                       "--eb-window", 2, "--save", tmp_path / "whole", *RUN)
    assert code == 0, err
    assert len(scans) == 5  # the run's search, prune and retrain share its one scan


def test_a_class_folder_lists_its_files_in_path_order_through_subfolders_and_links(tmp_path):
    """The order decides which images --val-fraction holds out: it is the order paths sort in."""
    from earlybird.data.decode import EXTENSIONS
    from earlybird.data.folder import _files

    for rel in ["a.png", "a-c.PNG", "a/b.png", "a/.hidden.jpg", "z.txt", "sub/dir/x.JPEG", "b.tar.gz", ".x"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")  # a linked file counts, a broken link does not,
    (tmp_path / "broken.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "dirlink").symlink_to(tmp_path / "sub", target_is_directory=True)  # nor a linked folder's files
    files = sorted(f for f in tmp_path.rglob("*") if f.is_file())
    assert _files(tmp_path) == ([str(f) for f in files if f.suffix.lower() in EXTENSIONS],
                                [str(f) for f in files if f.suffix.lower() not in EXTENSIONS])
    assert _files(tmp_path)[0][:3] == [str(tmp_path / "a" / ".hidden.jpg"), str(tmp_path / "a" / "b.png"),
                                       str(tmp_path / "a-c.PNG")]


def test_behind_a_proxy_the_hub_is_left_to_the_library_to_reach(monkeypatch):
    hf = sys.modules["earlybird.data.hf"]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # a direct connection would fail there
    assert hf._reachable("https://huggingface.co")
    monkeypatch.setattr(hf.urllib.request, "getproxies", dict)  # no proxy: the connection decides
    monkeypatch.setattr(hf.socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))
    assert not hf._reachable("https://huggingface.co")
