"""The training recipe beside the reference's SGD and step schedule: --optimizer adamw,
--lr-schedule cosine, --warmup-epochs and --label-smoothing."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from earlybird import ModelSpec, create_model
from earlybird.config import OptimConfig
from earlybird.errors import ConfigError
from earlybird.stages.common import make_optimizer
from earlybird.train import load_checkpoint, lr_at, train_epoch
from test_cli import TINY, assert_one_line_error, cli, interrupt_epoch

FAST = ["--amp", "off", "--channels-last", "off"]
ADAMW = ["--optimizer", "adamw", "--lr", "0.01", "--lr-schedule", "cosine", "--warmup-epochs", "1.5",
         "--label-smoothing", "0.1"]


def search(capsys, root, save, *extra):
    # 80 images in batches of 16: 5 steps an epoch
    return cli(capsys, "search", "--dataset", "cifar10", "--data", root, "--no-download", *TINY, *FAST,
               "--epochs", "4", "--ratios", "0.5", "--full", "--save", save, *extra)


def test_the_step_schedule_is_the_reference_one_at_every_step():
    optim = OptimConfig(epochs=6, lr=0.1, schedule=[2, 4], gamma=0.1)
    for step in range(6 * 7):
        assert lr_at(optim, step, 7) == pytest.approx(0.1 * 0.1 ** sum(step // 7 >= m for m in (2, 4)))


def test_warm_up_then_cosine_to_zero():
    optim = OptimConfig(epochs=4, lr=1.0, lr_schedule="cosine", warmup_epochs=1)
    lrs = [lr_at(optim, step, 10) for step in range(40)]
    assert lrs[:10] == pytest.approx([0.1 * (i + 1) for i in range(10)])  # the first step already moves
    assert lrs[10] == 1.0 and lrs[25] == pytest.approx(0.5)  # halfway through the cosine's 3 epochs
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:])) and 0 < lrs[-1] < 0.01
    # a warm-up that ends inside a step never overshoots --lr
    assert max(lr_at(OptimConfig(epochs=2, lr=1.0, warmup_epochs=0.25), s, 10) for s in range(20)) == 1.0


def test_adamw_decays_the_weights_of_convolutions_and_linear_layers_only():
    model = create_model(ModelSpec("vgg", 11, 0.0625, 3, 10, 32))
    adamw = make_optimizer(model, OptimConfig(optimizer="adamw"))
    assert isinstance(adamw, torch.optim.AdamW)
    decayed, plain = adamw.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0  # DeiT's default
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in plain["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert {names[id(p)] for p in decayed["params"]} == {n for n, p in model.named_parameters() if p.ndim > 1}
    # the BN scales among the undecayed: only the L1 term pulls them down
    assert any(n.endswith("features.1.weight") for n in map(names.get, map(id, plain["params"])))
    # a model that names more (timm's position embeddings and class token) is heard
    model.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 8))
    model.no_weight_decay = lambda: {"cls_token"}
    decayed, plain = make_optimizer(model, OptimConfig(optimizer="adamw")).param_groups
    assert any(p is model.cls_token for p in plain["params"]) and all(p is not model.cls_token
                                                                      for p in decayed["params"])
    sgd = make_optimizer(model, OptimConfig())
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["weight_decay"] == 1e-4
    assert len(sgd.param_groups[0]["params"]) == len(list(model.parameters()))


def test_label_smoothing_is_in_the_training_loss():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 10)
    x = 10 * torch.randn(8, 6)
    with torch.no_grad():
        y = model(x).argmax(1)  # confident and right: smoothing is most of the loss
        plain, smoothed = (F.cross_entropy(model(x), y, label_smoothing=s).item() for s in (0.0, 0.1))
    assert abs(plain - smoothed) > 0.1
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    assert train_epoch(model, [(x, y)], frozen, label_smoothing=0.1).loss == pytest.approx(smoothed, rel=1e-5)


def test_a_search_with_adamw_cosine_warm_up_and_smoothing_sets_the_rate_at_every_step(capsys, tmp_path,
                                                                                       cifar10_root):
    code, out, err = search(capsys, cifar10_root, tmp_path / "s", *ADAMW, "--eb-interval", "1")
    assert code == 0, err
    metrics = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    optim = OptimConfig(epochs=4, lr=0.01, lr_schedule="cosine", warmup_epochs=1.5, optimizer="adamw")
    # a record per step (the draws inside epochs), the rate its step trained at
    steps = {m["step"]: m["lr"] for m in metrics if "step" in m}
    assert len(steps) == 16 and all(lr == pytest.approx(lr_at(optim, s - 1, 5)) for s, lr in steps.items())
    epochs = [m for m in metrics if "step" not in m]
    assert [m["lr"] for m in epochs] == pytest.approx([lr_at(optim, 5 * e, 5) for e in range(4)])
    ckpt = load_checkpoint(tmp_path / "s" / "checkpoint.pth")
    assert ckpt["optimizer_kind"] == "adamw" and "exp_avg" in next(iter(ckpt["optimizer"]["state"].values()))


def test_the_l1_term_pulls_the_bn_scales_down_under_adamw_too(capsys, tmp_path, cifar10_root):
    means = {}
    for name, sparsity in (("l1", ["--s", "0.01"]), ("none", ["--no-sparsity-regularization"])):
        code, _, err = search(capsys, cifar10_root, tmp_path / name, *ADAMW, *sparsity)
        assert code == 0, err
        last = (tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1]
        means[name] = json.loads(last)["gamma"]["mean"]
    assert means["l1"] < means["none"] - 0.01, means


def test_an_adamw_cosine_run_resumed_after_ctrl_c_ends_as_an_uninterrupted_one(capsys, tmp_path, cifar10_root,
                                                                                monkeypatch):
    code, _, err = search(capsys, cifar10_root, tmp_path / "whole", *ADAMW)
    assert code == 0, err
    with monkeypatch.context() as patch:
        interrupt_epoch(patch, 3)
        code, _, err = search(capsys, cifar10_root, tmp_path / "cut", *ADAMW)
    assert code == 130, err
    code, out, err = search(capsys, cifar10_root, tmp_path / "cut", *ADAMW)
    assert code == 0 and "after epoch 2" in out, err
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pth")["state_dict"] for run in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_the_other_optimizer_is_refused(capsys, tmp_path, cifar10_root, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_epoch(patch, 2)
        code, _, _ = search(capsys, cifar10_root, tmp_path / "s", *ADAMW)
    assert code == 130
    code, out, err = search(capsys, cifar10_root, tmp_path / "s")
    assert_one_line_error(code, err, "was trained with --optimizer adamw: resume with it")
    assert load_checkpoint(tmp_path / "s" / "checkpoint.pth")["epoch"] == 1  # nothing lost


@pytest.mark.parametrize("flags, needle", [
    (["--lr-schedule", "cosine", "--schedule", "2"], "--lr-schedule cosine decays at every step, leave --schedule out"),
    (["--warmup-epochs", "4"], "--warmup-epochs 4 must be in [0, 4)"),
    (["--label-smoothing", "1"], "--label-smoothing 1 must be in [0, 1)"),
    (["--optimizer", "adamw", "--wl-momentum", "8"], "--wl-momentum quantizes SGD's momentum buffers"),
])
def test_bad_recipes_get_one_line(capsys, tmp_path, cifar10_root, flags, needle):
    code, _, err = search(capsys, cifar10_root, tmp_path / "s", *flags)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "s" / "checkpoint.pth").exists()


def test_cosine_needs_no_milestones():
    assert OptimConfig(epochs=10, lr_schedule="cosine").schedule == []
    with pytest.raises(ConfigError):
        OptimConfig(epochs=10, warmup_epochs=-1)
    assert math.isclose(OptimConfig(optimizer="adamw", weight_decay=0.1).weight_decay, 0.1)
