"""`earlybird export`: ONNX, TorchScript and torch.export files of dense and pruned networks load in a
process that cannot import earlybird and compute what the checkpoint's network computes."""
import subprocess
import sys

import pytest
import torch

from conftest import randomize_bn
from earlybird import EarlyBird, ModelSpec, create_model, prunable_layers, prune_model
from earlybird.train import load_checkpoint, model_from_checkpoint, save_checkpoint
from test_cli import assert_one_line_error, cli

ARCHS = {"vgg": ("vgg", 11, 0.125), "preresnet": ("preresnet", 20, 0.25), "resnet18": ("resnet", 18, 0.0625),
         "mobilenetv2": ("mobilenetv2", 0, 0.25), "densenet": ("densenet", 40, 0.25)}

# runs in a fresh interpreter where `import earlybird` fails: what a deployment machine has
LOADER = r"""
import json, sys
sys.modules["earlybird"] = None
import numpy as np, torch
fmt, path, inputs = sys.argv[1], sys.argv[2], torch.load(sys.argv[3])
if fmt == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {"input": inputs.numpy()})[0])
elif fmt == "torchscript":
    out = torch.jit.load(path)(inputs)
else:
    out = torch.export.load(path).module()(inputs)
torch.save(out, sys.argv[4])
"""


def _ticket(tmp_path, name: str, pruned: bool):
    arch, depth, width = ARCHS[name]
    torch.manual_seed(0)
    spec = ModelSpec(arch, depth, width, 3, 10, 32)
    model = create_model(spec)
    randomize_bn(model)
    x = torch.randn(4, 3, 32, 32)
    path = tmp_path / f"{name}-{'pruned' if pruned else 'dense'}.pth"
    if pruned:
        detector = EarlyBird(model, [0.5], layers=prunable_layers(model, x))
        detector.step(1)
        small, plan = prune_model(model.eval(), detector.layer_masks(0.5, detector.mask(0.5)), x)
        save_checkpoint(path, "pruned", spec, small, plan, input_shape=[3, 32, 32], dataset="cifar10")
    else:
        save_checkpoint(path, "ticket", spec, model, input_shape=[3, 32, 32], dataset="cifar10")
    return path


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_exports_deploy_without_earlybird(capsys, tmp_path, name, fmt):
    ckpt = _ticket(tmp_path, name, pruned=True)
    out = tmp_path / f"net.{fmt}"
    code, text, err = cli(capsys, "export", "--model", ckpt, "--format", fmt, "--out", out)
    assert code == 0, err
    assert "largest output difference" in text and out.exists()
    inputs = torch.randn(5, 3, 32, 32)  # neither the export's example batch (2) nor its check's (3)
    torch.save(inputs, tmp_path / "in.pt")
    run = subprocess.run([sys.executable, "-c", LOADER, fmt, str(out), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    model, _, plan = model_from_checkpoint(load_checkpoint(ckpt), ckpt)  # the network `earlybird eval` runs
    assert plan is not None
    with torch.no_grad():
        want = model.eval()(inputs)
    got = torch.load(tmp_path / "out.pt")
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_dense_checkpoint_exports_too_and_nothing_is_overwritten(capsys, tmp_path):
    ckpt = _ticket(tmp_path, "vgg", pruned=False)
    code, text, err = cli(capsys, "export", "--model", ckpt, "--format", "pt2")
    assert code == 0, err
    out = ckpt.with_suffix(".pt2")
    assert out.exists() and f"-> {out}" in text
    before = out.read_bytes()
    code, _, err = cli(capsys, "export", "--model", ckpt, "--format", "pt2")
    assert_one_line_error(code, err, "exists", "--force")
    assert out.read_bytes() == before
    code, _, err = cli(capsys, "export", "--model", tmp_path / "nothing.pth")
    assert_one_line_error(code, err, "does not exist")
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left


def test_a_full_disk_during_an_export_is_one_line_about_the_disk(capsys, tmp_path, monkeypatch):
    from earlybird import export

    ckpt = _ticket(tmp_path, "vgg", pruned=False)

    def full(model, example, path, meta):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("serialization failed") from OSError(28, "No space left on device")

    monkeypatch.setitem(export._WRITERS, "torchscript", full)
    code, _, err = cli(capsys, "export", "--model", ckpt, "--format", "torchscript")
    assert_one_line_error(code, err, f"could not write {ckpt.with_suffix('.torchscript.pt')}: No space left on device")
    assert not ckpt.with_suffix(".torchscript.pt").exists() and not list(tmp_path.glob(".*tmp*"))


def test_out_in_a_folder_that_does_not_exist_is_made_and_one_that_cannot_be_is_one_line(capsys, tmp_path):
    ckpt = _ticket(tmp_path, "vgg", pruned=False)
    out = tmp_path / "deploy" / "models" / "vgg.pt2"
    code, text, err = cli(capsys, "export", "--model", ckpt, "--format", "pt2", "--out", out)
    assert code == 0 and out.is_file() and f"-> {out}" in text, err
    (tmp_path / "plain-file").write_text("not a folder")
    code, _, err = cli(capsys, "export", "--model", ckpt, "--format", "pt2", "--out", tmp_path / "plain-file" / "x.pt2")
    assert_one_line_error(code, err, f"cannot write {tmp_path / 'plain-file' / 'x.pt2'}", "choose another --out")


def test_onnx_without_its_exporter_names_the_extra(capsys, tmp_path, monkeypatch):
    import sys

    ckpt = _ticket(tmp_path, "vgg", pruned=False)
    monkeypatch.setitem(sys.modules, "onnx", None)  # as after `pip install -e .` without [export]
    code, _, err = cli(capsys, "export", "--model", ckpt, "--format", "onnx")
    assert_one_line_error(code, err, "exporting to onnx needs onnx", 'pip install "earlybird[export]"')
    assert not list(tmp_path.glob(".*tmp*"))
