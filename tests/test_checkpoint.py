import errno
import os

import pytest
import torch

from earlybird.cli import main

from earlybird import CheckpointError, ModelSpec, channel_masks, create_model, prune_model
from earlybird.errors import WriteError
from earlybird.train import load_checkpoint, model_from_checkpoint, save_checkpoint

SPEC = ModelSpec("vgg", 11, 0.125, 3, 10, 32)


def test_dense_roundtrip_with_weights_only_load(tmp_path, small_vgg):
    path = save_checkpoint(tmp_path / "a.pth", "search", SPEC, small_vgg, epoch=3, note="x")
    raw = torch.load(path, weights_only=True)  # plain values and tensors only
    assert raw["epoch"] == 3 and raw["kind"] == "search"
    model, spec, plan = model_from_checkpoint(load_checkpoint(path), path)
    assert spec == SPEC and plan is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), small_vgg(x))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]  # no temporary files left


def test_pruned_roundtrip_rebuilds_without_the_original(tmp_path, small_vgg):
    pruned, plan = prune_model(small_vgg, channel_masks(small_vgg, [0.5])[0.5], torch.randn(2, 3, 32, 32))
    path = save_checkpoint(tmp_path / "p.pth", "pruned", SPEC, pruned, plan)
    model, _, loaded_plan = model_from_checkpoint(load_checkpoint(path, ("pruned",)), path)
    assert loaded_plan.to_dict() == plan.to_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), pruned.eval()(x))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0])
def test_truncated_checkpoint(tmp_path, small_vgg, keep):
    path = save_checkpoint(tmp_path / "t.pth", "search", SPEC, small_vgg)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_foreign_checkpoint(tmp_path, small_vgg):
    path = tmp_path / "ref.pth.tar"
    torch.save({"epoch": 3, "state_dict": small_vgg.state_dict()}, path)  # the reference scripts' layout
    with pytest.raises(CheckpointError, match="not an earlybird checkpoint"):
        load_checkpoint(path)


def test_wrong_kind(tmp_path, small_vgg):
    path = save_checkpoint(tmp_path / "d.pth", "search", SPEC, small_vgg)
    with pytest.raises(CheckpointError, match="'search' checkpoint, but a pruned checkpoint"):
        load_checkpoint(path, ("pruned",))


def test_weights_of_another_architecture(tmp_path, small_vgg):
    path = save_checkpoint(tmp_path / "w.pth", "search", SPEC, small_vgg)
    ckpt = load_checkpoint(path)
    ckpt["spec"] = ModelSpec("vgg", 13, 0.125, 3, 10, 32).to_dict()
    with pytest.raises(CheckpointError, match="another architecture"):
        model_from_checkpoint(ckpt, path)


def test_atomic_write_keeps_the_old_file_when_saving_fails(tmp_path, small_vgg, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pth", "search", SPEC, small_vgg, epoch=1)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(WriteError, match="c.pth: No space left on device.*previous version is intact"):
        save_checkpoint(path, "search", SPEC, create_model(SPEC), epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    path = tmp_path / "EB-30-5.pth"
    torch.save({"format": "earlybird-checkpoint", "kind": "ticket", "payload": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="would run code when loaded.*import-reference"):
        load_checkpoint(path)
    code = main(["prune", "--model", str(path), "--save", str(tmp_path / "p"), "--device", "cpu"])
    assert code == 2 and "would run code" in capsys.readouterr().err
    assert not marker.exists()


def test_only_tensors_and_plain_values_are_written(tmp_path, small_vgg):
    import numpy as np

    spec = ModelSpec("vgg", 11, 0.125, 3, 10, 32)
    save_checkpoint(tmp_path / "a.pth", "ticket", spec, small_vgg, epoch=np.int64(3), scores={"x": [np.float32(0.5)]})
    ckpt = load_checkpoint(tmp_path / "a.pth")
    assert type(ckpt["epoch"]) is int and type(ckpt["scores"]["x"][0]) is float
    with pytest.raises(TypeError, match=r"checkpoint\['where'\] is a set"):
        save_checkpoint(tmp_path / "b.pth", "ticket", spec, small_vgg, where={1, 2})
    assert not (tmp_path / "b.pth").exists()
