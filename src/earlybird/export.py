"""Deployable files of a network that load without earlybird: ONNX, TorchScript, torch.export (.pt2).

The pruned layers (constant folds, channel gathers) are plain tensor operations in every format;
the batch size stays free (a dynamic first axis in ONNX and .pt2; TorchScript traces are
shape-generic in it).
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, EarlyBirdError
from .files import os_error, tensor_bytes, write_error

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}
META_KEY, META_FILE = "earlybird", "earlybird.json"


def export_model(model: nn.Module, example_inputs: torch.Tensor, path: str | Path, fmt: str,
                 metadata: dict | None = None) -> Path:
    """Write ``model`` (evaluated on the CPU in eval mode) to ``path`` in ``fmt``: one of ``FORMATS``.
    ``example_inputs``: a batch of two or more inputs of the model's shape; ``metadata``: plain
    values (the input's preprocessing, the class names) stored in the file as JSON under ``earlybird``
    (ONNX: a metadata property; TorchScript and .pt2: an extra file ``earlybird.json``), read back by
    ``read_metadata``. Written to a temporary file and renamed, so a failed export leaves nothing behind."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}': choose one of {', '.join(FORMATS)}")
    model = model.cpu().eval()
    example = example_inputs.cpu()
    path = Path(path).expanduser()
    try:  # a missing folder is made, as --save makes one; the exporters want a file of their own extension
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=FORMATS[fmt])
    except OSError as exc:
        raise ConfigError(f"cannot write {path} ({exc.strerror or exc}): choose another --out") from None
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and exporter chatter; failures raise
            _WRITERS[fmt](model, example, tmp, json.dumps(metadata or {}))
        os.replace(tmp, path)
    except EarlyBirdError:
        raise
    except ImportError as exc:  # the exporter itself is missing, not the model's fault
        raise ConfigError(f"exporting to {fmt} needs {exc.name or 'a package'}: pip install \"earlybird[export]\"") \
            from None
    except Exception as exc:  # noqa: BLE001 - an exporter's failure on a model is one line
        if os_error(exc) is not None:  # the disk, not the format
            raise write_error(path, os_error(exc), tensor_bytes(model.state_dict())) from None
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"exporting to {fmt} failed ({type(exc).__name__}: {first}): try another --format") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _batch_dim() -> dict:
    return {"x": {0: torch.export.Dim("batch", min=1, max=1 << 16)}}


def _pt2(model, example, path, meta: str) -> None:
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=_batch_dim()), path,
                      extra_files={META_FILE: meta})


def _torchscript(model, example, path, meta: str) -> None:
    torch.jit.trace(model, example, check_trace=False).save(path, _extra_files={META_FILE: meta})


def _onnx(model, example, path, meta: str) -> None:
    import onnx

    torch.onnx.export(model, (example,), path, dynamo=True, input_names=["input"], output_names=["logits"],
                      dynamic_shapes=_batch_dim(), external_data=False, verbose=False)
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {META_KEY: meta})
    onnx.save(proto, path)


def read_metadata(path: str | Path, fmt: str) -> dict:
    """The ``metadata`` an export stored (what a deployment needs to feed the network)."""
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props.get(META_KEY, "{}"))
    extra = {META_FILE: ""}
    if fmt == "torchscript":
        torch.jit.load(str(path), _extra_files=extra)
    else:
        torch.export.load(str(path), extra_files=extra)
    return json.loads(extra[META_FILE] or "{}")


_WRITERS = {"onnx": _onnx, "torchscript": _torchscript, "pt2": _pt2}


def max_difference(path: str | Path, fmt: str, model: nn.Module, inputs: torch.Tensor) -> float | None:
    """The largest difference between the exported file's outputs and ``model``'s on ``inputs``,
    relative to the largest output; None for ONNX where onnxruntime is not installed."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; users still load it
        want = model.cpu().eval()(inputs)
        if fmt == "torchscript":
            got = torch.jit.load(str(path))(inputs)
        elif fmt == "pt2":
            got = torch.export.load(str(path)).module()(inputs)
        else:
            try:
                import onnxruntime
            except ImportError:
                return None
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"input": inputs.numpy()})[0])
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
