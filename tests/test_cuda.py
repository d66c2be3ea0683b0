"""On a GPU: search -> prune -> retrain in bf16 and in fp16 with loss scaling (a ViT's heads and
neurons too), --compile,
--deterministic reruns, a GPU checkpoint resumed on the CPU, and torchrun with NCCL on 2+ GPUs.
Skipped where CUDA is absent; benchmarks/gpu.sh runs them on a GPU machine."""
import json
import subprocess
import sys

import pytest
import torch

from earlybird.train import load_checkpoint
from test_cli import TINY, cli, interrupt_epoch
from test_distributed import ENV, tickets

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SMALL = {"vgg": ["--arch", "vgg", "--depth", "11", "--width", "0.125"],
         "preresnet": ["--arch", "preresnet", "--depth", "20", "--width", "0.25"]}
SCHEDULE = ["--dataset", "cifar10", "--no-download", "--batch-size", "16", "--test-batch-size", "64", "--seed", "0",
            "--epochs", "4", "--schedule", "2", "--ratios", "0.5", "--eb-window", "2", "--eb-threshold", "0.9",
            "--measure-speed", "--latency-batches", "2"]


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability(0)


@pytest.mark.parametrize("arch", list(SMALL))
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_run_on_one_gpu(capsys, tmp_path, cifar10_root, arch, dtype):
    if dtype == "bf16" and _capability() < (8, 0):
        pytest.skip("bf16 tensor cores need compute capability 8.0")
    save = tmp_path / "run"
    code, out, err = cli(capsys, "run", *SCHEDULE, *SMALL[arch], "--data", cifar10_root, "--device", "cuda",
                         "--amp", "on", "--amp-dtype", dtype, "--save", save)
    assert code == 0, err
    assert "GPU: " in out and "compute capability" in out  # which GPU, and which autocast type
    search = json.loads((save / "search" / "summary.json").read_text())
    assert search["precision"] == f"{dtype} autocast" and search["tickets"]
    for row in json.loads((save / "summary.json").read_text())["ratios"]:
        tag = round(row["ratio"] * 100)
        pruned = json.loads((save / f"pruned-{tag}" / "summary.json").read_text())
        assert pruned["device"] == "cuda:0" and pruned["max_output_diff_pruned_vs_masked"] < 1e-3
        assert pruned["training_throughput"]["speedup"] > 0
        retrain = json.loads((save / f"retrain-{tag}" / "summary.json").read_text())
        assert 0 <= retrain["final_test_acc"] <= 100  # an fp16 overflow skips a step, not the run


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_vits_heads_and_neurons_on_one_gpu(capsys, tmp_path, cifar10_root, dtype):
    from test_gates import _spec

    if dtype == "bf16" and _capability() < (8, 0):
        pytest.skip("bf16 tensor cores need compute capability 8.0")
    spec = _spec("timm-vit")
    save = tmp_path / "run"
    code, out, err = cli(capsys, "run", *SCHEDULE, "--arch", spec.arch, "--model-kwargs",
                         *[f"{k}={v!r}" for k, v in spec.kwargs], "--optimizer", "adamw", "--lr", "1e-3",
                         "--data", cifar10_root, "--device", "cuda", "--amp", "on", "--amp-dtype", dtype, "--save", save)
    assert code == 0, err
    pruned = json.loads((save / "pruned-50" / "summary.json").read_text())
    assert pruned["device"] == "cuda:0" and pruned["max_output_diff_pruned_vs_masked"] < 1e-3
    assert pruned["units"]["head"] == [8, 4] and pruned["units"]["neuron"][1] < pruned["units"]["neuron"][0]
    assert 0 <= json.loads((save / "retrain-50" / "summary.json").read_text())["final_test_acc"] <= 100


@pytest.mark.parametrize("arch", list(SMALL))
def test_compiled_run_on_one_gpu(capsys, tmp_path, cifar10_root, arch):
    code, out, err = cli(capsys, "run", *SCHEDULE, *SMALL[arch], "--data", cifar10_root, "--device", "cuda",
                         "--compile", "--save", tmp_path / "run")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["ratios"]


def test_deterministic_reruns_are_bit_identical(capsys, tmp_path, cifar10_root):
    argv = ["search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY, "--device", "cuda",
            "--epochs", 3, "--schedule", 2, "--ratios", 0.5, "--full", "--deterministic", "--amp", "on"]
    for name in ("a", "b"):
        assert cli(capsys, *argv, "--save", tmp_path / name)[0] == 0
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pth") for n in ("a", "b"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert torch.equal(a["scores"], b["scores"])


def test_a_gpu_checkpoint_resumes_on_the_cpu(capsys, tmp_path, cifar10_root, monkeypatch):
    argv = ["search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY, "--epochs", 4,
            "--schedule", 2, "--ratios", 0.5, "--full", "--wl-weight", 8, "--wl-grad", 8, "--save", tmp_path / "s"]
    interrupt_epoch(monkeypatch, 3)
    assert cli(capsys, *argv, "--device", "cuda")[0] == 130
    ckpt = load_checkpoint(tmp_path / "s" / "checkpoint.pth")
    assert ckpt["speed"]["device"] == "cuda" and ckpt["precision"]["generator_device"] == "cuda"
    code, out, err = cli(capsys, *argv, "--device", "cpu")
    assert code == 0, err
    assert "the run started on cuda" in out and "new random stream" in out
    assert load_checkpoint(tmp_path / "s" / "checkpoint.pth")["epoch"] == 4


def _torchrun(*argv, nproc=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "earlybird", *map(str, argv)], env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_nccl_search_prune_and_sync_bn_retrain(tmp_path, cifar10_root):
    # NCCL serves GPU tensors only: every collective (the BN-scale check after each epoch too) must be on one
    common = ["--dataset", "cifar10", "--data", cifar10_root, "--no-download", "--batch-size", 16,
              "--test-batch-size", 64, "--seed", 0, "--device", "cuda", "--amp", "off"]
    search = ["search", *common, *SMALL["preresnet"], "--epochs", 4, "--schedule", 2, "--ratios", 0.5,
              "--eb-window", 2, "--eb-threshold", 0.9, "--sync-bn"]
    two = _torchrun(*search, "--save", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("search epoch 1/4") == 1  # rank 0 alone speaks
    found = tickets(tmp_path / "two")
    assert found
    # a pruned PreResNet has select BNs: under --sync-bn they keep their channel gather
    ticket = tmp_path / "two" / next(iter(json.loads((tmp_path / "two" / "summary.json").read_text())["tickets"]
                                           .values()))["path"]
    pruned = subprocess.run([sys.executable, "-m", "earlybird", "prune", "--model", ticket, "--data", cifar10_root,
                             "--device", "cuda", "--latency-batches", "--save", tmp_path / "p"], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    retrain = _torchrun("retrain", "--model", tmp_path / "p" / "pruned.pth", *common, "--epochs", 4, "--schedule", 2,
                        "--sync-bn", "--save", tmp_path / "r")
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["final_test_acc"] >= 0
    # an explicit GPU index under torchrun is a one-line error, not two ranks on one GPU
    bad = _torchrun(*search, "--device", "cuda:0", "--save", tmp_path / "bad")
    assert bad.returncode != 0 and "use --device cuda" in bad.stderr
