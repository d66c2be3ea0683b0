"""Many processes (torchrun, gloo on CPU) and surviving a SIGKILL: both as a user runs them, in subprocesses."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import torch

from earlybird.train import load_checkpoint

ARGS = ["search", "--dataset", "cifar10", "--no-download", "--arch", "vgg", "--depth", "11", "--width", "0.0625",
        "--batch-size", "16", "--test-batch-size", "64", "--seed", "0", "--device", "cpu", "--epochs", "6", "--schedule", "3",
        "--ratios", "0.3", "0.5", "--eb-window", "2", "--eb-threshold", "0.2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def earlybird(*argv, nproc=1, **kwargs):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "earlybird", *map(str, argv)], env=ENV, capture_output=True, text=True,
                          timeout=240, **kwargs)


def tickets(save):
    summary = json.loads((save / "summary.json").read_text())
    return {r: (t["epoch"], load_checkpoint(save / t["path"])["mask"]) for r, t in summary["tickets"].items()}


def test_two_gloo_workers_find_the_same_tickets_as_one_process(tmp_path, cifar10_root):
    # fp32 (the tolerances below are fp32's); the memory format is timed by both workers
    # torch's convolutions: GEMM layers are timed per run (the workers take rank 0's: test_gemm_conv)
    two = earlybird(*ARGS, "--amp", "off", "--cpu-kernels", "off", "--data", cifar10_root, "--save", tmp_path / "two",
                    "--sync-bn", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    # only rank 0 prints; the workers took rank 0's choice of memory format
    assert two.stdout.count("search: vgg11") == 1 and two.stdout.count("search epoch 1/6") == 1
    assert two.stdout.count("training in ") == 1
    chosen = json.loads((tmp_path / "two" / "summary.json").read_text())["memory_format"]
    one = earlybird(*ARGS, "--amp", "off", "--cpu-kernels", "off", "--channels-last",
                    "on" if chosen == "channels-last" else "off", "--data", cifar10_root, "--save", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    a, b = tickets(tmp_path / "one"), tickets(tmp_path / "two")
    assert a.keys() == b.keys() == {"0.3", "0.5"}
    for r in a:
        assert a[r][0] == b[r][0] and torch.equal(a[r][1], b[r][1]), r
    wa = load_checkpoint(tmp_path / "one" / "checkpoint.pth")["state_dict"]
    wb = load_checkpoint(tmp_path / "two" / "checkpoint.pth")["state_dict"]
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-4), k


def test_two_gloo_workers_retrain_a_pruned_preresnet_with_sync_bn_as_one_process(tmp_path, cifar10_root):
    # a pruned PreResNet reads its residual streams through select BNs (a channel gather before the
    # BN): under --sync-bn they keep the gather and take the global batch's statistics
    data = ["--dataset", "cifar10", "--no-download", "--data", cifar10_root, "--device", "cpu", "--seed", "0",
            "--batch-size", "16", "--test-batch-size", "64", "--amp", "off", "--channels-last", "off"]
    search = earlybird("search", *data, "--arch", "preresnet", "--depth", "20", "--width", "0.25", "--epochs", "2",
                       "--schedule", "1", "--ratios", "0.5", "--full", "--save", tmp_path / "s")
    assert search.returncode == 0, search.stderr[-3000:]
    pruned = earlybird("prune", "--model", tmp_path / "s" / "checkpoint.pth", "--data", cifar10_root, "--device", "cpu",
                       "--latency-batches", "--save", tmp_path / "p")
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["selects"]
    retrain = ["retrain", "--model", tmp_path / "p" / "pruned.pth", *data, "--epochs", "4", "--schedule", "3",
               "--start-epoch", "2"]
    two = earlybird(*retrain, "--sync-bn", "--save", tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = earlybird(*retrain, "--save", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    wa = load_checkpoint(tmp_path / "one" / "checkpoint.pth")["state_dict"]
    wb = load_checkpoint(tmp_path / "two" / "checkpoint.pth")["state_dict"]
    assert wa.keys() == wb.keys()  # a synchronized network saves what the plain one loads
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-4), k


def test_sigkill_at_a_random_point_then_the_same_command_continues(tmp_path, cifar10_root):
    # wider and longer than ARGS, so that epochs take long enough to be killed in the middle
    argv = [*ARGS, "--width", "0.25", "--epochs", "12", "--full", "--deterministic", "--data", cifar10_root]
    clean = earlybird(*argv, "--save", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    save = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "earlybird", *map(str, argv), "--save", str(save)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = save / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    time.sleep(random.uniform(0, 0.5))  # somewhere in a later epoch, or in a checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert done < 12, "the run finished before it could be killed"
    assert not (save / "summary.json").exists()
    again = earlybird(*argv, "--save", save)
    assert again.returncode == 0, again.stderr
    resumed_after = int(again.stdout.split("resuming search from")[1].split("after epoch")[1].split()[0])
    assert resumed_after >= done  # at most the epoch in flight was lost
    assert not list(save.glob(".*.tmp"))  # no half-written checkpoint left behind
    a, b = tickets(tmp_path / "clean"), tickets(save)
    assert {r: e for r, (e, _) in a.items()} == {r: e for r, (e, _) in b.items()}
    wa = load_checkpoint(tmp_path / "clean" / "checkpoint.pth")["state_dict"]
    wb = load_checkpoint(save / "checkpoint.pth")["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


PROBE = """
import json, sys, time, torch
from pathlib import Path
from earlybird.accel import tuning
from earlybird.train import distributed
distributed.init_from_env(False)
if distributed.world().rank == 1:  # this worker alone finds bf16 far slower
    conv2d = tuning.F.conv2d
    def slow(x, w, **kw):
        if x.dtype == torch.bfloat16:
            time.sleep(0.05)
        return conv2d(x, w, **kw)
    tuning.F.conv2d = slow
found = tuning.autocast_slowdown("cpu", torch.bfloat16)
Path(sys.argv[1], f"{distributed.world().rank}.json").write_text(json.dumps(found))  # the workers' prints interleave
distributed.finish()  # as the CLI does: gloo aborts a process that exits with the group still up
"""


def test_the_workers_take_the_first_workers_precision_probe(tmp_path):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--no-python", sys.executable, "-c", PROBE, tmp_path], env=ENV,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    found = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert found[0] == found[1] > 0  # without agreeing, rank 1 measured 50 ms more


def test_sigterm_under_torchrun_stops_every_worker_like_ctrl_c_and_the_run_resumes(tmp_path, cifar10_root):
    """SLURM sends SIGTERM to every process of the job (torchrun forwards it again to its workers);
    Kubernetes to the container's first process, torchrun, alone. Either way each worker says the
    one line and stops at once (no barrier in collectives it stopped in), and the run resumes."""
    save = tmp_path / "s"
    args = [*ARGS[:-11], "--epochs", 30, "--ratios", 0.5, "--full", "--cpu-kernels", "off", "--data", cifar10_root,
            "--save", save]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "earlybird",
            *args]
    for everyone in (True, False):
        proc = subprocess.Popen(list(map(str, argv)), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        for line in proc.stdout:
            if line.startswith("search epoch "):  # an epoch is saved
                (os.killpg if everyone else os.kill)(proc.pid, signal.SIGTERM)
                break
        started = time.monotonic()
        _, err = proc.communicate(timeout=120)
        assert time.monotonic() - started < 20, err[-3000:]  # torchrun waits 30 s before it kills a worker
        lines = err.splitlines()
        assert sum(line.startswith("earlybird search: terminated; the last completed epoch is saved")
                   for line in lines) == 2, err[-3000:]
        assert not [line for line in lines if "/earlybird/" in line], err[-3000:]  # torchrun's own report only
        assert not list(save.glob(".*.tmp"))
    epoch = load_checkpoint(save / "checkpoint.pth")["epoch"]
    again = earlybird(*args, nproc=2)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"after epoch {epoch}" in again.stdout and load_checkpoint(save / "checkpoint.pth")["epoch"] == 30
