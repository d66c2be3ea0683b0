"""Gates on attention heads and MLP neurons (EarlyBERT's units): each family gets gates that change
nothing until trained, the method ranks heads within layers and neurons globally, the pruned network
equals the gated, masked one on inputs it was not planned on, and it exports and loads without
earlybird; structures that cannot be pruned exactly are named, not silently mangled."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import earlybird
from earlybird import EarlyBird, ModelSpec, apply_mask, channel_mask, create_model, prune_model
from earlybird.errors import PruneError
from earlybird.gates import Gate, attach_gates, find_gates, gates
from earlybird.sparsity import add_gate_l1_grad
from earlybird.train import load_checkpoint, model_from_checkpoint, save_checkpoint
from test_cli import assert_one_line_error, cli
from test_export import LOADER
from test_zoo_models import _zoo


def tv_vit(num_classes=10, in_channels=3):
    """torchvision's VisionTransformer at a size the suite can train (nn.MultiheadAttention inside)."""
    _zoo("torchvision")
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                             num_classes=num_classes)


class EncoderNet(nn.Module):
    """Patches into nn.TransformerEncoderLayer: PyTorch's own encoder, as users write it."""

    def __init__(self, num_classes=10, in_channels=3, heads=4):
        super().__init__()
        self.patches = nn.Conv2d(in_channels, 32, 8, stride=8)
        layer = nn.TransformerEncoderLayer(32, heads, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(tokens).mean(1))


class HybridNet(EncoderNet):
    """A convolutional stem with batch norm under the encoder: BN channels and gates in one network."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__(num_classes, 16)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x):
        return super().forward(self.stem(x))


def encoder_net(num_classes=10, in_channels=3):
    return EncoderNet(num_classes, in_channels)


def hybrid_net(num_classes=10, in_channels=3):
    return HybridNet(num_classes, in_channels)


def plain_mlp(num_classes=10, in_channels=3):
    """Neither a batch norm nor a structure a gate fits: nothing to prune."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 32 * 32, 32), nn.LayerNorm(32), nn.GELU(),
                         nn.Linear(32, num_classes))


class MyAttention(nn.Module):
    """An attention module of a kind no gate family knows."""

    def __init__(self, dim=32):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out((q @ k.transpose(-2, -1)).softmax(-1) @ v)


TIMM_VIT = ("timm:vit_tiny_patch16_224", (("patch_size", 8), ("depth", 2), ("embed_dim", 48), ("num_heads", 4)))
TIMM_CONVNEXT = ("timm:convnext_atto", (("dims", (8, 16, 16, 32)), ("depths", (1, 1, 1, 1))))
FAMILIES = {
    "timm-vit": TIMM_VIT,
    "timm-convnext": TIMM_CONVNEXT,  # 1x1-conv MLPs
    "timm-convnext-linear": (TIMM_CONVNEXT[0], TIMM_CONVNEXT[1] + (("conv_mlp", False),)),  # nn.Linear MLPs
    "torchvision-vit": ("test_gates:tv_vit", ()),
    "transformer-encoder": ("test_gates:encoder_net", ()),
}
KINDS = {"timm-vit": {"head", "neuron"}, "timm-convnext": {"neuron"}, "timm-convnext-linear": {"neuron"},
         "torchvision-vit": {"head", "neuron"}, "transformer-encoder": {"head", "neuron"}}


def _spec(family: str) -> ModelSpec:
    arch, kwargs = FAMILIES[family]
    if arch.startswith("timm:"):
        _zoo("torchvision")
        _zoo("timm")
    return ModelSpec(arch, 0, 1.0, 3, 10, 32, kwargs)


def _randomize_gates(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, gate in gates(model):
            gate.weight.copy_(torch.rand(gate.weight.shape, generator=g) * 1.5 + 0.1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_is_gated_found_pruned_exactly_and_rebuilt_from_its_plan(family, tmp_path):
    torch.manual_seed(0)
    spec = _spec(family)
    model = create_model(spec).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    names = attach_gates(model)
    assert names and {g.kind for _, g in gates(model)} == KINDS[family] and not find_gates(model).unsupported
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6)  # gates of ones change nothing
    _randomize_gates(model)
    detector = EarlyBird(model, [0.5])
    detector.step(1)
    masks = detector.layer_masks(0.5, detector.mask(0.5))
    for name, gate in gates(model):  # heads ranked within their layer, one kept at least; half of each kind goes
        if gate.kind == "head":
            assert int(masks[name].sum()) == gate.weight.numel() - gate.weight.numel() // 2
    small, plan = prune_model(model, masks, x)
    assert not any(isinstance(m, Gate) for m in small.modules())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert plan.units and set(plan.units) == set(names)
    masked = apply_mask(model, plan.masks(model)).eval()
    others = [3 * torch.randn(6, 3, 32, 32) + 1, torch.rand(6, 3, 32, 32)]  # not the planning batch
    with torch.no_grad():
        for batch in others:
            want, got = masked(batch), small.eval()(batch)
            assert (got - want).abs().max() <= 1e-5 * (1 + want.abs().max())
    # a pruned checkpoint rebuilds from its spec and plan alone
    path = save_checkpoint(tmp_path / "pruned.pth", "pruned", spec, small, plan, input_shape=[3, 32, 32],
                           dataset="cifar10")
    rebuilt, _, _ = model_from_checkpoint(load_checkpoint(path), path)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(others[0]), small(others[0]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_pruned_family_exports_and_loads_without_earlybird(capsys, tmp_path, family):
    torch.manual_seed(1)
    spec = _spec(family)
    model = create_model(spec).eval()
    attach_gates(model)
    _randomize_gates(model, seed=1)
    detector = EarlyBird(model, [0.5])
    detector.step(1)
    x = torch.randn(4, 3, 32, 32)
    small, plan = prune_model(model, detector.layer_masks(0.5, detector.mask(0.5)), x)
    ckpt = save_checkpoint(tmp_path / "pruned.pth", "pruned", spec, small, plan, input_shape=[3, 32, 32],
                           dataset="cifar10")
    inputs = torch.randn(5, 3, 32, 32)
    torch.save(inputs, tmp_path / "in.pt")
    with torch.no_grad():
        want = small.eval()(inputs)
    for fmt in ("onnx", "torchscript", "pt2"):
        out = tmp_path / f"net.{fmt}"
        code, _, err = cli(capsys, "export", "--model", ckpt, "--format", fmt, "--out", out)
        assert code == 0, err
        run = subprocess.run([sys.executable, "-c", LOADER, fmt, str(out), str(tmp_path / "in.pt"),
                              str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        got = torch.load(tmp_path / "out.pt")
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-4 * (1 + want.abs().max()), fmt


def test_heads_rank_within_their_layer_neurons_and_channels_globally_and_a_layer_keeps_one_head():
    # two head layers of 4, a neuron layer of 6, a BN of 4; scores chosen so a global ranking would differ
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4,  5.0, 6.0, 7.0, 8.0,  1, 2, 3, 4, 5, 6,  0.5, 0.6, 0.7, 0.8])
    sizes, kinds = [4, 4, 6, 4], ["head", "head", "neuron", "channel"]
    keep = channel_mask(scores, 0.5, sizes, kinds=kinds)
    assert keep[:4].tolist() == [False, False, True, True]  # two of each head layer, however large its scores
    assert keep[4:8].tolist() == [False, False, True, True]
    assert keep[8:14].tolist() == [False] * 3 + [True] * 3  # neurons: half of all neurons
    assert keep[14:].tolist() == [False, False, True, True]  # BN channels ranked among themselves
    nearly_all = channel_mask(scores, 0.99, sizes, kinds=kinds)
    assert nearly_all[:4].sum() == 1 and nearly_all[4:8].sum() == 1  # a layer keeps its strongest head
    own = channel_mask(scores, 0.5, sizes, kinds=kinds, kind_ratios={"head": 0.25})  # --head-ratio 0.25
    assert own[:4].tolist() == [False, True, True, True] and torch.equal(own[8:], keep[8:])


def test_head_and_neuron_ratios_hold_for_every_target_of_a_search(capsys, tmp_path, cifar10_root):
    spec = _spec("timm-vit")
    kwargs = [f"{k}={v!r}" for k, v in spec.kwargs]
    code, out, err = cli(capsys, "search", "--data", cifar10_root, *FAST, "--arch", spec.arch, "--model-kwargs", *kwargs,
                         "--ratios", 0.25, 0.5, "--head-ratio", 0.5, "--neuron-ratio", 0.25, "--epochs", 2,
                         "--save", tmp_path / "s")
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "s" / "checkpoint.pth")
    det = ckpt["detector"]
    assert det["kind_ratios"] == ckpt["kind_ratios"] == {"head": 0.5, "neuron": 0.25}
    index = earlybird.ChannelIndex(tuple(ckpt["layers"]), tuple(det["layer_sizes"]), tuple(det["kinds"]))
    for ratio in ("0.25", "0.5"):
        masks = index.split(det["recent"][ratio][-1])
        heads = [m for n, m in masks.items() if n.endswith("head_gate")]
        neurons = sum(int(m.sum()) for n, m in masks.items() if n.endswith("neuron_gate"))
        assert all(int(m.sum()) == 2 for m in heads)  # half of each layer's 4 heads at both ratios
        assert neurons == 2 * 192 - int(2 * 192 * 0.25)  # a quarter of the neurons at both ratios
    code, _, err = cli(capsys, "search", "--data", cifar10_root, *FAST, "--arch", spec.arch, "--model-kwargs", *kwargs,
                       "--head-ratio", 1.5, "--save", tmp_path / "t")
    assert_one_line_error(code, err, "pruning ratio 1.5 is outside (0, 1)")


def test_a_network_with_batch_norms_and_gates_prunes_both_exactly(tmp_path):
    from conftest import randomize_bn

    torch.manual_seed(0)
    spec = ModelSpec("test_gates:hybrid_net", 0, 1.0, 3, 10, 32)
    model = create_model(spec).eval()
    randomize_bn(model)
    attach_gates(model)
    _randomize_gates(model)
    x = torch.randn(4, 3, 32, 32)
    layers = earlybird.prunable_layers(model, x)
    assert sorted(n for n in layers if not n.endswith("_gate")) == ["stem.1", "stem.4"] and len(layers) == 6
    detector = EarlyBird(model, [0.5], layers=layers)
    detector.step(1)
    assert set(detector.index.kinds) == {"channel", "head", "neuron"}
    small, plan = prune_model(model, detector.layer_masks(0.5, detector.mask(0.5)), x)
    assert plan.keep and plan.units  # channels of the stem's BNs and units of the gates both went
    assert small.stem[0].out_channels < 16 and small.encoder.layers[0].linear1.out_features < 64
    masked = apply_mask(model, plan.masks(model), plan.zeroed).eval()
    with torch.no_grad():
        for batch in (3 * torch.randn(6, 3, 32, 32) + 1, torch.rand(6, 3, 32, 32)):
            want = masked(batch)
            assert (small.eval()(batch) - want).abs().max() <= 1e-5 * (1 + want.abs().max())
    path = save_checkpoint(tmp_path / "pruned.pth", "pruned", spec, small, plan, input_shape=[3, 32, 32],
                           dataset="cifar10")
    rebuilt, _, _ = model_from_checkpoint(load_checkpoint(path), path)  # units first, then channels, as pruned
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), small(x))


def test_a_macs_budget_covers_heads_and_neurons():
    from earlybird.budget import solve_budget
    from earlybird.cost import count_macs

    torch.manual_seed(0)
    model = create_model(_spec("timm-vit")).eval()
    attach_gates(model)
    _randomize_gates(model)
    index = earlybird.ChannelIndex.of(model)
    scores = dict(zip(index.names, earlybird.BNScale().scores(model, index.names)))
    x = torch.randn(2, 3, 32, 32)
    ticket = solve_budget(model, scores, x, "macs", 0.6, round_to=8)
    small, plan = prune_model(model, ticket.masks, x, round_to=8)
    reached = count_macs(small, (3, 32, 32)) / count_macs(model, (3, 32, 32))
    assert 0.5 < reached <= 0.6 and abs(reached - ticket.reached) < 1e-9
    assert all(len(plan.units[n]) < g.weight.numel() for n, g in gates(model))  # heads and neurons both went


def test_a_mask_that_removes_every_head_of_a_layer_is_one_error():
    torch.manual_seed(0)
    model = create_model(_spec("transformer-encoder")).eval()
    attach_gates(model)
    masks = {name: torch.ones(g.weight.numel(), dtype=torch.bool) for name, g in gates(model)}
    masks["encoder.layers.0.self_attn.head_gate"][:] = False
    with pytest.raises(PruneError, match="remove all 4 channels of layer 'encoder.layers.0.self_attn.head_gate'"):
        prune_model(model, masks, torch.randn(2, 3, 32, 32))


def test_gate_l1_pulls_the_gates_down():
    torch.manual_seed(0)
    results = []
    for strength in (0.0, 1e-2):
        torch.manual_seed(0)
        model = encoder_net()
        attach_gates(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(20):
            x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            add_gate_l1_grad(model, strength)
            optimizer.step()
        results.append(torch.cat([g.weight.detach().abs() for _, g in gates(model)]).mean().item())
    assert results[1] < results[0] - 0.015  # 20 steps of lr x strength = 0.02 each


def test_gate_sparsity_is_the_searchs_l1_on_the_gates(capsys, tmp_path, cifar10_root):
    spec = _spec("timm-vit")
    kwargs = [f"{k}={v!r}" for k, v in spec.kwargs]
    means = []
    for strength in (0, 0.05):
        save = tmp_path / f"s{strength}"
        code, _, err = cli(capsys, "search", "--data", cifar10_root, *FAST, "--arch", spec.arch, "--model-kwargs",
                           *kwargs, "--gate-sparsity", strength, "--epochs", 1, "--schedule", "--full", "--save", save)
        assert code == 0, err
        state = load_checkpoint(save / "checkpoint.pth")["state_dict"]
        means.append(torch.cat([v.abs() for k, v in state.items() if k.endswith("_gate.weight")]).mean().item())
    assert means[1] < means[0] - 0.003  # 5 steps: AdamW moves each gate by about lr (1e-3) a step


def test_unsupported_attention_is_named_and_the_rest_still_prunes():
    _zoo("torchvision")
    timm = _zoo("timm")
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=4,
                            scale_attn_norm=True, num_classes=10)
    found = find_gates(vit)
    assert set(found.unsupported) == {"blocks.0.attn", "blocks.1.attn"}
    assert "normalizes across heads" in found.unsupported["blocks.0.attn"]
    assert {g.kind for _, g in gates(vit)} == set() and attach_gates(vit) == ["blocks.0.mlp.neuron_gate",
                                                                             "blocks.1.mlp.neuron_gate"]
    custom = nn.Sequential(nn.Linear(8, 32), MyAttention(32))
    assert "an attention module of a kind earlybird does not gate" in find_gates(custom).unsupported["1"]
    v2 = timm.create_model("convnextv2_atto", num_classes=10)  # its MLPs normalize across their neurons (GRN)
    assert find_gates(v2).unsupported["stages.0.blocks.0.mlp"] == ("GlobalResponseNormMlp: an MLP of a kind "
                                                                   "earlybird does not gate")


def test_the_search_names_unsupported_attention_once_and_prunes_the_rest(capsys, tmp_path, cifar10_root):
    spec = _spec("timm-vit")
    kwargs = [f"{k}={v!r}" for k, v in spec.kwargs] + ["scale_attn_norm=True"]
    code, out, err = cli(capsys, "search", "--data", cifar10_root, *FAST, "--arch", spec.arch, "--model-kwargs",
                         *kwargs, "--epochs", 1, "--schedule", "--save", tmp_path / "s")
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: 2 modules keep all their units")]
    assert len(notes) == 1 and "blocks.0.attn (Attention: normalizes across heads" in notes[0]
    assert "ratios are of the 384 prunable MLP neurons (2 layers)" in out


def test_a_network_without_bn_or_gateable_structures_is_one_line(capsys, tmp_path, cifar10_root):
    code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", "--arch",
                       "test_gates:plain_mlp",
                       "--epochs", 1, "--save", tmp_path / "s")
    assert_one_line_error(code, err, "no batch-norm layers and no attention heads or MLP neurons",
                          "found 2 Linear, 1 LayerNorm")


FAST = ["--dataset", "cifar10", "--no-download", "--batch-size", 16, "--test-batch-size", 64, "--epochs", 3,
        "--schedule", 2, "--ratios", 0.5, "--eb-window", 2, "--eb-threshold", 0.99, "--amp", "off",
        "--channels-last", "off", "--cpu-kernels", "off", "--optimizer", "adamw", "--lr", 1e-3]


@pytest.mark.parametrize("family", ["timm-vit", "timm-convnext"])
def test_the_whole_pipeline_runs_on_a_timm_vit_and_convnext(capsys, tmp_path, cifar10_root, family):
    spec = _spec(family)
    save = tmp_path / "run"
    kwargs = [f"{k}={v!r}".replace(" ", "") for k, v in spec.kwargs]
    code, out, err = cli(capsys, "run", "--data", cifar10_root, *FAST, "--latency-batches", "--arch", spec.arch,
                         "--model-kwargs", *kwargs, "--save", save)
    assert code == 0, err
    assert "prunable MLP neurons" in out and ("prunable attention heads" in out) == (family == "timm-vit")
    pruned = json.loads((save / "pruned-50" / "summary.json").read_text())
    assert pruned["max_output_diff_relative"] < 1e-5 and pruned["macs"]["after"] < pruned["macs"]["before"]
    units = pruned["units"]
    assert units["neuron"][1] < units["neuron"][0] and units["neuron"][1] % 8 == 0  # --round-to's default 8
    if family == "timm-vit":
        assert units["head"] == [8, 4]
        ticket = next((save / "search").glob("EB-50-*.pth"))
        code, out, err = cli(capsys, "prune", "--model", ticket, "--percent", 0.25, "--data", cifar10_root,
                             "--dataset", "cifar10", "--no-download", "--save", tmp_path / "p25")
        assert code == 0, err
        again = json.loads((tmp_path / "p25" / "summary.json").read_text())  # the mask recomputed per kind
        assert again["units"]["head"] == [8, 6] and again["max_output_diff_relative"] < 1e-5
    search = load_checkpoint(save / "search" / "checkpoint.pth")
    assert search["gates"] and any(k.endswith("neuron_gate.weight") for k in search["state_dict"])
    retrain = json.loads((save / "retrain-50" / "summary.json").read_text())
    assert retrain["final_test_acc"] >= 0
    code, out, err = cli(capsys, "report", save)
    assert code == 0, err
    assert (save / "report" / "heatmap.png").exists()


def test_a_vit_fine_tunes_from_saved_weights_with_its_gates(capsys, tmp_path, cifar10_root):
    spec = _spec("timm-vit")
    torch.manual_seed(0)
    weights = tmp_path / "vit.pth"
    torch.save(create_model(spec).state_dict(), weights)  # a plain network's weights: no gates in the file
    kwargs = [f"{k}={v!r}" for k, v in spec.kwargs]
    code, out, err = cli(capsys, "search", "--data", cifar10_root, *FAST, "--arch", spec.arch, "--model-kwargs",
                         *kwargs, "--weights", weights, "--eb-interval", 0.5, "--save", tmp_path / "s")
    assert code == 0, err
    assert f"starting weights {weights}" in out and "EB ticket p=0.5" in out
    ticket = next((tmp_path / "s").glob("EB-50-*.pth"))
    state = load_checkpoint(ticket)["state_dict"]
    start = torch.load(weights)
    assert any(not torch.equal(state[k], start[k]) for k in start)  # trained from those weights
    assert all(k in state for k in start)  # under their own names: gates sit beside the projections


def test_lightning_finds_and_prunes_a_vit_ticket(tmp_path, cifar10_root):
    task_module = pytest.importorskip("lightning_task")
    from torch.utils.data import DataLoader

    from earlybird.lightning import EarlyBirdCallback

    torch.manual_seed(0)
    spec = _spec("timm-vit")
    task = task_module.Task(lr=1e-3, net=create_model(spec), optimizer="adamw")
    x = torch.randn(2, 3, 32, 32)
    callback = EarlyBirdCallback([0.5], example_inputs=x, module="net", window=2, threshold=0.5)
    run = task_module.trainer(max_epochs=6, callbacks=[callback])
    run.fit(task, DataLoader(task_module.data(cifar10_root), batch_size=16, shuffle=True))
    assert {g.kind for _, g in gates(task.net)} == {"head", "neuron"}  # gated in setup, trained by the optimizer
    assert any(not torch.all(g.weight == 1) for _, g in gates(task.net))
    epoch = callback.detector.emerged[0.5]
    assert run.current_epoch == epoch < 6
    small, plan = callback.prune(0.5, task)
    with torch.no_grad():
        want = apply_mask(task.net, plan.masks(task.net)).eval()(x)
        assert torch.allclose(small.eval()(x), want, atol=1e-5)


def test_the_commands_of_docs_transformers_run_as_written(capsys, tmp_path, cifar10_root, monkeypatch):
    """docs/transformers.md's two commands, on the suite's CIFAR files (the test's data, batch size,
    epochs and a loose threshold added, so a ticket emerges within them)."""
    import re
    import shlex
    from pathlib import Path

    _spec("timm-vit")  # timm importable
    page = (Path(__file__).parents[1] / "docs" / "transformers.md").read_text()
    block = re.search(r"```bash\n(.*?)```", page, re.S).group(1).replace("\\\n", " ")
    commands = [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("earlybird ")]
    assert [c[0] for c in commands] == ["run", "export"]
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, *commands[0], "--data", cifar10_root, "--no-download", "--epochs", 3,
                         "--batch-size", 16, "--test-batch-size", 64, "--eb-window", 2, "--eb-threshold", 0.99,
                         "--amp", "off", "--channels-last", "off", "--latency-batches")
    assert code == 0, err
    assert "18 prunable attention heads and 4608 prunable MLP neurons" in out  # depth 6 of 3 heads, 768 neurons
    code, out, err = cli(capsys, *commands[1])
    assert code == 0, err
    assert (tmp_path / "runs" / "vit" / "retrain-30" / "model_best.onnx").exists()


def test_the_library_example_of_docs_transformers_runs():
    import re
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "transformers.md").read_text()
    code = re.search(r"<!-- gates-example -->\s*```python\n(.*?)```", page, re.S).group(1)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "docs/transformers.md", "exec"), scope)
    detector, model, small, plan, x = (scope[k] for k in ("detector", "model", "small", "plan", "x"))
    assert detector.done and set(plan.units) == {n for n, _ in gates(model)}
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    masked = apply_mask(model, plan.masks(model)).eval()
    with torch.no_grad():
        for batch in (x[:64], 3 * torch.randn(16, 16, 64)):
            torch.testing.assert_close(small.eval()(batch), masked(batch), rtol=1e-5, atol=1e-5)
