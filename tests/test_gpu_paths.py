"""The CUDA and multi-process paths, checked on a CPU by reproducing the constraints that matter:
an NCCL group that serves only GPU tensors, device counts, compute capabilities, a visible-device
mask, a checkpoint written on a GPU, fp16 overflow, torch.compile's graph breaks."""
import ast
import copy
import importlib
import os
import pathlib
import subprocess

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import randomize_bn
from earlybird import EarlyBird, ModelSpec, create_model, prune_model
from earlybird.cli import main
from earlybird.config import RuntimeConfig
from earlybird import data as data_module
from earlybird.data import BatchLoader
from earlybird.errors import ConfigError, TrainingError
from earlybird.lowp import LowPrecision, Precision
from earlybird.prune import SelectBatchNorm2d, prunable_layers
from earlybird.stages import common
from earlybird.accel import speed, tuning
from earlybird.train import distributed, train_epoch
from earlybird.train.distributed import World
from test_cli import TINY, cli, interrupt_epoch
from test_distributed import ENV

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "earlybird"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
               "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv"}
prune_stage = importlib.import_module("earlybird.stages.prune")  # earlybird.stages.prune is the function
resolve_device = common.resolve_device  # conftest's guard wraps the module's; this is the function itself


def _collective_calls():
    """(file, enclosing function, collective) for every torch.distributed collective called in src/."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr in COLLECTIVES and ast.unparse(node.func.value) in ("dist", "torch.distributed"):
                    found.append((path.relative_to(SRC).as_posix(), fn.name, node.func.attr))
    return found


def test_every_collective_goes_through_the_one_helper():
    # NCCL has no CPU backend: a collective on a CPU tensor fails after epoch 1 of every multi-GPU run,
    # so none may be issued anywhere but in the helper that places the tensor first
    calls = _collective_calls()
    assert calls and {(f, fn) for f, fn, _ in calls} == {("train/distributed.py", "_all_reduce")}, calls


@pytest.mark.parametrize("backend, types", [("gloo", {"cpu", "cuda"}), ("cuda:gloo", {"cuda"})])
def test_the_group_says_which_devices_its_collectives_take(tmp_path, monkeypatch, backend, types):
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed._group_device_types() == types
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
        monkeypatch.setattr(distributed, "_WORLD", World(0, 2, 0))  # collectives on: a group of one stands in
        if backend == "cuda:gloo":
            # bound to the cuda device type, gloo rejects CPU tensors exactly as NCCL does: the search's
            # check of the BN scales met this after epoch 1 of every multi-GPU run
            with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
                dist.all_reduce(torch.ones(2))
            assert distributed.collective_device(torch.ones(2)) == torch.device("cuda", 3)
        else:
            assert distributed.collective_device(torch.ones(2)) == torch.device("cpu")
            t = torch.tensor([1.0, 2.0])
            distributed.check_agree(t, "the BN scales")  # through the helper, end to end
            assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("types, tensor, want", [
    ({"cuda"}, "cpu", ("cuda", 1)),            # NCCL, a CPU tensor (the BN scales): to this rank's GPU
    ({"cuda"}, ("cuda", 1), ("cuda", 1)),      # NCCL, already on the GPU: stays
    ({"cpu", "cuda"}, "cpu", "cpu"),           # gloo: CPU tensors as they are
    ({"cpu"}, "meta", "cpu"),                  # a group of CPUs only, anything else: to the CPU
])
def test_the_collective_device_table(monkeypatch, types, tensor, want):
    monkeypatch.setattr(distributed, "_group_device_types", lambda: types)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    if isinstance(tensor, tuple):  # a stand-in for a GPU tensor: only its .device is read
        t = type("GpuTensor", (), {"device": torch.device(*tensor)})()
    else:
        t = torch.empty(2, device=tensor)
    want = torch.device(*want) if isinstance(want, tuple) else torch.device(want)
    assert distributed.collective_device(t) == want


def _fake_gpus(monkeypatch, count: int, world=World()):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(distributed, "_WORLD", world)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


ALONE, RANK1_OF_2, RANK3_OF_4_NODE2 = World(), World(1, 2, 1), World(3, 4, 1)


@pytest.mark.parametrize("name, gpus, world, want", [
    ("auto", 0, ALONE, "cpu"),
    ("cpu", 2, ALONE, "cpu"),
    ("auto", 2, ALONE, "cuda:0"),
    ("cuda", 2, ALONE, "cuda:0"),             # crashed in torch.cuda.set_device (no index)
    ("auto", 2, RANK1_OF_2, "cuda:1"),
    ("cuda", 2, RANK1_OF_2, "cuda:1"),
    ("cuda", 2, RANK3_OF_4_NODE2, "cuda:1"),  # the local rank, not the global one
    ("cuda:1", 2, ALONE, "cuda:1"),
    ("cuda:0", 2, RANK1_OF_2, "error: under torchrun each of the 2 processes takes its own GPU"),
    ("cuda:2", 2, ALONE, "error: this machine has 2 GPU(s), numbered 0..1"),
    ("cuda", 1, RANK1_OF_2, "error: at most 1 processes per node"),
    ("cuda", 0, ALONE, "error: no CUDA device is available here; use --device cpu"),
    ("tpu", 0, ALONE, "error: is not a device"),
])
def test_device_flag_table(monkeypatch, name, gpus, world, want):
    _fake_gpus(monkeypatch, gpus, world)
    if want.startswith("error: "):
        with pytest.raises(ConfigError, match=want.removeprefix("error: ").replace("(", r"\(").replace(")", r"\)")):
            resolve_device(name)
    else:
        assert resolve_device(name) == torch.device(want)


def test_a_gpu_index_past_the_mask_names_the_mask(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=4,6"):
        resolve_device("cuda:2")


def _pruned(spec):
    torch.manual_seed(0)
    model = randomize_bn(create_model(spec)).eval()
    x = torch.randn(4, 3, 32, 32)
    detector = EarlyBird(model, [0.5], layers=prunable_layers(model, x, False))
    detector.step()
    pruned, _ = prune_model(model, detector.layer_masks(0.5, detector.mask(0.5)), x)
    assert any(type(m) is SelectBatchNorm2d for m in pruned.modules())  # what torch's conversion broke
    return pruned, x


@pytest.mark.parametrize("spec", [ModelSpec("preresnet", 20, 0.5), ModelSpec("densenet", 10, 1.0)],
                         ids=["preresnet20", "densenet"])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_sync_bn_keeps_a_pruned_networks_channel_gathers(spec, device):
    pruned, x = _pruned(spec)
    synced = distributed.sync_batchnorm(copy.deepcopy(pruned), torch.device(device))
    select_form, plain_form = ((distributed.SyncSelectBatchNorm2d, nn.SyncBatchNorm) if device == "cuda" else
                               (distributed.GlobalSelectBatchNorm2d, distributed.GlobalBatchNorm2d))
    before = {n: type(m) for n, m in pruned.named_modules()}
    after = {n: type(m) for n, m in synced.named_modules()}
    assert before.keys() == after.keys()
    for n, kind in before.items():
        assert after[n] is {SelectBatchNorm2d: select_form, nn.BatchNorm2d: plain_form}.get(kind, kind), n
    assert synced.state_dict().keys() == pruned.state_dict().keys()  # its checkpoints load into the plain network
    for name, m in synced.named_modules():
        if isinstance(m, SelectBatchNorm2d):
            assert m.in_channels == pruned.get_submodule(name).in_channels
    # no process group: SyncBatchNorm and GlobalBatchNorm2d compute a plain BN, in eval and in training
    for train in (False, True):
        a, b = copy.deepcopy(pruned).train(train), copy.deepcopy(synced).train(train)
        with torch.no_grad():
            assert torch.allclose(a(x), b(x), atol=1e-6)


@pytest.mark.parametrize("capability, want", [((6, 1), torch.float16), ((7, 0), torch.float16),
                                               ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_gpus_without_bf16_tensor_cores_train_in_fp16(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts for torch
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Tesla V100-SXM2-16GB")
    gpu = torch.device("cuda", 0)
    assert tuning.default_autocast_dtype(gpu) == want
    assert speed.autocast_dtype(RuntimeConfig(), gpu) == want
    assert speed.autocast_dtype(RuntimeConfig(amp_dtype="bf16"), gpu) == torch.bfloat16  # the flag decides
    text = tuning.describe_gpu(gpu)
    assert f"compute capability {capability[0]}.{capability[1]}" in text
    assert ("fp16 autocast with loss scaling" if want == torch.float16 else "bf16 autocast") in text
    assert tuning.default_autocast_dtype("cpu") == torch.bfloat16


@pytest.mark.parametrize("mask, ids, want", [
    (None, [0, 2], "0,2"),
    ("4,5,6,7", [1, 3], "5,7"),       # SLURM gave this job GPUs 4-7: logical 1 and 3 are physical 5 and 7
    ("3, 1", [0], "3"),
    ("GPU-aa11,GPU-bb22,MIG-cc33", [2, 0], "MIG-cc33,GPU-aa11"),
])
def test_gpu_ids_map_through_the_visible_mask(monkeypatch, mask, ids, want):
    if mask is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
    assert distributed.visible_devices(ids) == want


@pytest.mark.parametrize("threads", [None, "4"])
def test_the_gpu_ids_launcher_gives_each_worker_its_gpus_and_one_thread(monkeypatch, threads):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    if threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
    seen = {}

    def launch(config, entrypoint):
        def run(*args):
            seen.update(env=dict(os.environ), nproc=config.nproc_per_node, args=args)
        return run

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", launch)
    assert distributed.launch_on_gpus([1, 3], ["search", "--gpu-ids", "1,3"]) == 0
    assert seen["nproc"] == 2 and seen["args"] == ("-m", "earlybird", "search", "--gpu-ids", "1,3")
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "5,7"
    assert seen["env"]["OMP_NUM_THREADS"] == (threads or "1")  # as torchrun: one thread unless set


class CountedLen:
    """A loader that counts how often its length is asked."""

    def __init__(self, batches):
        self.batches, self.asked = batches, 0

    def __len__(self):
        self.asked += 1
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _linear_batches(n=12, poison=()):
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(n):
        x = torch.randn(8, 6, generator=g)
        if i in poison:
            x[0, 0] = float("inf")  # the forward overflows: the loss is NaN
        batches.append((x, torch.randint(0, 3, (8,), generator=g)))
    return batches


def test_an_epoch_asks_its_loaders_length_once():
    loader = CountedLen(_linear_batches())
    model = nn.Linear(6, 3)
    train_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), on_batch=lambda *a: None)
    assert loader.asked == 1  # a folder loader's length walked its index: 0.26 s a call for ImageNet


def test_a_step_the_loss_scaler_skips_counts_nowhere():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    reference = copy.deepcopy(model)
    batches = _linear_batches(4, poison={1})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    result = train_epoch(model, CountedLen(batches), torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
    # the epoch is as if the overflowing batch had not been there: same weights, same mean loss
    kept = [b for i, b in enumerate(batches) if i != 1]
    clean = train_epoch(reference, CountedLen(kept), torch.optim.SGD(reference.parameters(), lr=0.1))
    assert scaler.get_scale() == 2.0 ** 7  # the scaler saw the overflow and halved its scale
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert result.loss == pytest.approx(clean.loss, rel=1e-5)
    assert result.accuracy == pytest.approx(clean.accuracy)


@pytest.mark.parametrize("scaled", [False, True])
def test_real_divergence_still_fails_the_epoch(scaled):
    model = nn.Linear(6, 3)
    scaler = torch.amp.GradScaler("cpu") if scaled else None
    poison = {0, 1, 2} if scaled else {2}  # without loss scaling one NaN loss is enough
    with pytest.raises(TrainingError, match="diverged"):
        train_epoch(model, CountedLen(_linear_batches(4, poison)), torch.optim.SGD(model.parameters(), lr=0.1),
                    scaler=scaler)


def _precision(device="cpu"):
    return Precision(LowPrecision(weight=8, grad=8), nn.Linear(4, 4), torch.device(device), 0,
                     torch.zeros(1, 4))


def test_the_rounding_stream_of_a_gpu_checkpoint_continues_on_a_cpu():
    state = _precision().state_dict()
    assert state["generator_device"] == "cpu"
    gpu_state = {**state, "generator": torch.arange(16, dtype=torch.uint8), "generator_device": "cuda"}
    draws = []
    for _ in range(2):
        p = _precision()
        note = p.load_state_dict(gpu_state)  # set_state raised: a CUDA generator's state is 16 bytes
        assert "new random stream" in note and "for cuda" in note
        draws.append(torch.rand(4, generator=p.generator))
    assert torch.equal(*draws)  # the same checkpoint, the same stream
    same = _precision()
    assert same.load_state_dict(state) is None
    assert torch.equal(same.generator.get_state(), state["generator"])


HAZARD = ["layer1.0.downsample.0"]


@pytest.mark.parametrize("resumed, device, hazards, slowdown, want, note", [
    # a run started on a GPU: nothing it measured holds here
    ({"channels_last": True, "autocast": "bfloat16", "device": "cuda"}, "cpu", [], 1.0, None, "started on cuda"),
    ({"channels_last": False, "autocast": None, "device": "cpu"}, "cuda", [], 1.0, None, "started on cpu"),
    # the same kind of device: kept, unless this one breaks it
    ({"channels_last": True, "autocast": "bfloat16", "device": "cpu"}, "cpu", [], 1.0, (True, torch.bfloat16), ""),
    ({"channels_last": True, "autocast": "bfloat16", "device": "cpu"}, "cpu", HAZARD, 1.0, (False, torch.bfloat16),
     "contiguous (channels-last breaks layer 'layer1.0.downsample.0'"),
    ({"channels_last": True, "autocast": "bfloat16", "device": "cpu"}, "cpu", [], 7.9, (True, None),
     "fp32 (bf16 autocast took 7.9x as long"),
    ({"channels_last": True, "autocast": "bfloat16"}, "cpu", [], 1.0, (True, torch.bfloat16), ""),  # older checkpoint
    ({"channels_last": True, "autocast": "bfloat16", "device": "cuda"}, "cuda", [], 1.0, (True, torch.float16),
     "fp16 autocast (this device's autocast type)"),  # an A100 run resumed on a V100
])
def test_a_resumed_setting_is_checked_on_this_device(monkeypatch, resumed, device, hazards, slowdown, want, note):
    monkeypatch.setattr(speed, "autocast_slowdown", lambda kind, dtype: slowdown)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    kept, said = speed.resumed_setting(resumed, RuntimeConfig(), torch.device(device), hazards)
    assert kept == want
    assert note in said and bool(said) == bool(note)


def _compile_counts(model, x):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    return explained.graph_count, explained.graph_break_count


@pytest.mark.parametrize("spec", [ModelSpec("preresnet", 20, 0.5), ModelSpec("densenet", 10, 1.0)],
                         ids=["preresnet20", "densenet"])
def test_pruned_networks_compile_as_one_graph(spec):
    pruned, x = _pruned(spec)
    # was 26 graphs for PreResNet-20: a break in every fold conv, and a recompile per block shape
    assert _compile_counts(pruned.train(), x) == (1, 0)
    compiled = torch.compile(pruned, backend="eager", fullgraph=True)
    for train in (True, False):
        eager, graph = copy.deepcopy(pruned).train(train), compiled.train(train)
        assert torch.allclose(graph(x), eager(x), atol=1e-5)
    out = compiled.train()(x)
    out.sum().backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def ticket(tmp_path_factory, cifar10_root):
    """An EB ticket of a tiny VGG (a window of 2 at threshold 0.99: the ticket of epoch 2)."""
    save = tmp_path_factory.mktemp("search")
    assert main(["search", "--dataset", "cifar10", "--data", str(cifar10_root), "--no-download", *map(str, TINY),
                 "--epochs", "3", "--schedule", "2", "--ratios", "0.5", "--eb-window", "2", "--eb-threshold", "0.99", "--save",
                 str(save)]) == 0
    return save / "EB-50-2.pth"


def test_prune_and_eval_build_only_the_test_loader(capsys, tmp_path, cifar10_root, ticket, monkeypatch):
    built = []

    class Spy(BatchLoader):
        def __init__(self, images, labels, batch_size, info, train, *args, **kwargs):
            built.append(train)  # a training loader copies the whole training split to the device
            super().__init__(images, labels, batch_size, info, train, *args, **kwargs)

    monkeypatch.setattr(data_module, "BatchLoader", Spy)
    code, _, err = cli(capsys, "prune", "--model", ticket, "--data", cifar10_root, "--latency-batches",
                       "--device", "cpu", "--save", tmp_path / "p")
    assert code == 0, err
    code, _, err = cli(capsys, "eval", "--model", tmp_path / "p" / "pruned.pth", "--data", cifar10_root,
                       "--device", "cpu")
    assert code == 0, err
    assert built == [False, False]


@pytest.mark.parametrize("rank", [0, 1])
def test_prune_times_one_workers_batch_on_rank_0_only(capsys, tmp_path, cifar10_root, ticket, monkeypatch, rank):
    # two workers stood in for by one process: rank ``rank`` of 2, its collectives summing over itself
    world = World(rank, 2, rank)
    monkeypatch.setattr(distributed, "init_from_env", lambda use_cuda: world)
    monkeypatch.setattr(distributed, "_WORLD", world)
    monkeypatch.setattr(distributed, "_all_reduce", lambda t, op=None: t)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    timed = []
    for name in ("inference_speed", "training_speed"):
        real = getattr(prune_stage, name)

        def spy(*args, real=real, name=name, **kwargs):
            timed.append((name, args[4] if name == "training_speed" else None))
            return real(*args, **kwargs)

        monkeypatch.setattr(prune_stage, name, spy)
    save = tmp_path / "p"
    if rank:
        save.mkdir()  # rank 0 makes it
    code, _, err = cli(capsys, "prune", "--model", ticket, "--data", cifar10_root, "--batch-size", 16,
                       "--test-batch-size", 64, "--measure-speed", "--latency-batches", 2, "--device", "cpu", "--save",
                       save)
    assert code == 0, err
    # rank 0 times training at its own 8 of the global 16 (on one GPU the global batch may not fit);
    # the others wait instead of timing the same thing on the same node
    assert timed == ([("inference_speed", None), ("training_speed", 8)] if rank == 0 else [])
    assert (save / "summary.json").exists() == (rank == 0)


def test_a_gpu_runs_checkpoint_resumes_on_the_cpu(capsys, tmp_path, cifar10_root, monkeypatch):
    argv = ["search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY, "--epochs", 4, "--schedule", 2,
            "--ratios", 0.5, "--full", "--wl-weight", 8, "--wl-grad", 8, "--save", tmp_path / "s"]
    interrupt_epoch(monkeypatch, 3)
    assert cli(capsys, *argv)[0] == 130
    path = tmp_path / "s" / "checkpoint.pth"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["speed"]["device"] == "cpu" and ckpt["precision"]["generator_device"] == "cpu"
    # what a run on a GPU writes: its setting and rounding stream are the GPU's, its tensors' storages say cuda
    ckpt["speed"] = {"channels_last": True, "autocast": "bfloat16", "gemm": {}, "device": "cuda"}
    ckpt["precision"].update(generator=torch.arange(16, dtype=torch.uint8), generator_device="cuda")
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(ckpt, path)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert "resuming search from" in out and "after epoch 2" in out
    assert "the run started on cuda: choosing the speed settings for cpu again" in out
    assert "stochastic rounding continues with a new random stream" in out
    done = torch.load(path, weights_only=True)
    assert done["epoch"] == 4 and done["speed"]["device"] == "cpu" and done["speed"]["autocast"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script would run in full")
def test_gpu_sh_checks_its_machine_before_it_starts(tmp_path):
    done = subprocess.run(["bash", str(SRC.parents[1] / "benchmarks" / "gpu.sh")], env={**ENV, "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no GPU visible" in done.stdout  # one line, to the log too
    assert "no GPU visible" in (tmp_path / "device.txt").read_text() and not (tmp_path / "tests.txt").exists()
