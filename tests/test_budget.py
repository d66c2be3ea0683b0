"""Budget tickets: the ratio that meets a MACs or parameter budget after coupling and rounding."""
import json

import pytest
import torch

from conftest import randomize_bn
from earlybird import ConfigError, ModelSpec, PruneError, create_model, prunable_layers
from earlybird.budget import solve_budget
from earlybird.cost import count_macs, count_params
from earlybird.importance import BNScale
from earlybird.prune import channel_ties, prune_model
from earlybird.train import load_checkpoint, save_checkpoint
from test_cli import assert_one_line_error, cli

NETS = {"vgg": ("vgg", 11, 0.125), "resnet18": ("resnet", 18, 0.0625), "mobilenetv2": ("mobilenetv2", 0, 0.25)}


def _dense(name):
    arch, depth, width = NETS[name]
    torch.manual_seed(0)
    model = create_model(ModelSpec(arch, depth, width, 3, 10, 32)).eval()
    randomize_bn(model)
    return model, torch.randn(4, 3, 32, 32)


@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("name", list(NETS))
def test_the_pruned_network_meets_the_budget(name, metric, round_to):
    model, x = _dense(name)
    layers = prunable_layers(model, x)
    scores = dict(zip(layers, BNScale().scores(model, layers)))
    found = solve_budget(model, scores, x, metric, 0.5, channel_ties(model, x), round_to=round_to)
    small, _ = prune_model(model, found.masks, x, round_to=round_to, scores=scores)
    measure = (lambda m: count_macs(m, (3, 32, 32))) if metric == "macs" else count_params
    reached = measure(small) / measure(model)
    assert reached == pytest.approx(found.reached) and reached <= 0.5
    # within one layer's rounding: one bisection step less (a few channels of one layer) breaks it
    worse = solve_budget(model, scores, x, metric, reached - 1e-9, channel_ties(model, x), round_to=round_to, steps=12)
    assert worse.ratio > found.ratio
    assert 0.5 - reached < 0.08, (name, metric, round_to, reached)


def test_prune_takes_a_budget_and_reports_it(capsys, tmp_path, cifar10_root):
    model, x = _dense("vgg")
    spec = ModelSpec("vgg", 11, 0.125, 3, 10, 32)
    ticket = tmp_path / "EB-50-3.pth"
    save_checkpoint(ticket, "ticket", spec, model, ratio=0.5, epoch=3, dataset="cifar10", input_shape=[3, 32, 32],
                    layers=prunable_layers(model, x))
    code, out, err = cli(capsys, "prune", "--model", ticket, "--data", cifar10_root, "--target-macs", 0.4)
    assert code == 0, err
    summary = json.loads((tmp_path / "pruned-macs40" / "summary.json").read_text())
    budget, macs = summary["budget"], summary["macs"]
    assert budget["metric"] == "macs" and budget["asked"] == 0.4
    assert budget["reached"] == pytest.approx(macs["after"] / macs["before"], abs=1e-4) and budget["reached"] <= 0.4
    assert "budget: 0.4 of the dense network's macs asked" in out
    assert load_checkpoint(tmp_path / "pruned-macs40" / "pruned.pth")["ratio"] == pytest.approx(budget["ratio"], abs=1e-4)
    code, _, err = cli(capsys, "prune", "--model", ticket, "--data", cifar10_root, "--target-macs", 0.4, "--percent", 0.5)
    assert_one_line_error(code, err, "--percent and --target-macs both say how much to prune")
    code, _, err = cli(capsys, "prune", "--model", ticket, "--data", cifar10_root, "--target-params", 1.5)
    assert_one_line_error(code, err, "--target-params 1.5 is outside (0, 1)")
    code, _, err = cli(capsys, "prune", "--model", ticket, "--data", cifar10_root, "--target-macs", 0.001,
                       "--save", tmp_path / "tiny")
    assert_one_line_error(code, err, "cannot be met")


def test_a_budget_outside_the_range_is_refused():
    model, x = _dense("vgg")
    layers = prunable_layers(model, x)
    scores = dict(zip(layers, BNScale().scores(model, layers)))
    with pytest.raises(ConfigError, match="outside"):
        solve_budget(model, scores, x, "macs", 0.0)
    with pytest.raises(PruneError, match="cannot be met"):
        solve_budget(model, scores, x, "params", 1e-4)


def test_a_budget_is_a_detector_target_next_to_the_ratios():
    from earlybird import EarlyBird
    from earlybird.budget import BudgetTarget

    model, x = _dense("vgg")
    layers = prunable_layers(model, x)
    target = BudgetTarget("macs", 0.5, model, x)
    det = EarlyBird(model, [0.3], window=2, threshold=0.0, layers=layers, budgets=[target])
    assert det.targets == (0.3, "macs50")
    assert det.step(1) == [] and det.step(2) == [0.3, "macs50"]  # the same scores twice: settled
    small, _ = prune_model(model, det.layer_masks("macs50"), x)
    assert count_macs(small, (3, 32, 32)) / count_macs(model, (3, 32, 32)) == pytest.approx(target.last.reached)
    assert target.last.reached <= 0.5
    restored = EarlyBird(model, [0.3], window=2, threshold=0.0, layers=layers, budgets=[BudgetTarget("macs", 0.5, model, x)])
    restored.load_state_dict(det.state_dict())
    assert restored.emerged == {0.3: 2, "macs50": 2} and torch.equal(restored.tickets["macs50"], det.tickets["macs50"])
    with pytest.raises(ConfigError, match="resume with the flags"):  # another budget than the saved run's
        EarlyBird(model, [0.3], window=2, layers=layers).load_state_dict(det.state_dict())


def test_run_searches_prunes_and_retrains_a_budget_ticket(capsys, tmp_path, cifar10_root):
    from test_cli import TINY

    save = tmp_path / "run"
    code, out, err = cli(capsys, "run", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY,
                         "--epochs", 4, "--ratios", "--target-macs", 0.5, "--eb-window", 2, "--eb-threshold", 0.9,
                         "--save", save)
    assert code == 0, err
    search = json.loads((save / "search" / "summary.json").read_text())
    ticket = search["tickets"]["macs50"]
    assert search["ratios"] == [] and search["budgets"] == ["macs50"] and ticket["path"].startswith("EB-macs50-")
    saved = load_checkpoint(save / "search" / ticket["path"])
    assert saved["budget"]["metric"] == "macs" and saved["budget"]["reached"] <= 0.5
    pruned = json.loads((save / "pruned-macs50" / "summary.json").read_text())
    assert pruned["budget"]["asked"] == 0.5 and pruned["macs"]["after"] <= 0.5 * pruned["macs"]["before"]
    row = json.loads((save / "summary.json").read_text())["ratios"][0]
    assert row["ratio"] == "macs50" and row["acc_retrained"] is not None
    assert "p=macs50" in out and "    macs50" in out  # the progress line and the table name it


@pytest.mark.parametrize("name", list(NETS))
def test_the_architecture_counts_what_prune_model_builds(name):
    # budget solving measures candidates without prune_model's float64 build and checks: its MACs and
    # parameters must still be the pruned network's own, fold biases included
    from earlybird.prune import pruned_architecture

    model, x = _dense(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.abs_()  # positive shifts: every removed channel emits a constant to fold
    layers = prunable_layers(model, x)
    mask = {n: torch.rand(model.get_submodule(n).num_features, generator=torch.Generator().manual_seed(1)) > 0.5
            for n in layers}
    small, plan = prune_model(model, mask, x, round_to=8)
    shape = pruned_architecture(model, mask, x, round_to=8)
    assert count_params(shape) == count_params(small) and count_macs(shape, (3, 32, 32)) == count_macs(small, (3, 32, 32))
    bias_folds = [n for n, kind in plan.folds.items() if kind == "bias" and model.get_submodule(n).bias is None]
    without = pruned_architecture(model, mask, x, round_to=8, folds=False)
    assert count_macs(without, (3, 32, 32)) == count_macs(small, (3, 32, 32))  # folds add no MACs
    assert count_params(small) - count_params(without) == sum(small.get_submodule(n).bias.numel() for n in bias_folds)


def test_search_solves_budgets_for_its_round_to(capsys, tmp_path, cifar10_root, monkeypatch):
    # --target-macs is met "after coupling and --round-to": search takes the flag that prune and run take
    import importlib

    search_stage = importlib.import_module("earlybird.stages.search")  # the module, not the function
    made = []
    real = search_stage.BudgetTarget
    monkeypatch.setattr(search_stage, "BudgetTarget", lambda *args, **kw: made.append(args[-1]) or real(*args, **kw))
    for flags, want in (([], 8), (["--round-to", 4], 4)):
        code, _, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", "--arch",
                           "vgg", "--depth", 11, "--width", 0.0625, "--batch-size", 16, "--epochs", 1, "--ratios",
                           "--target-macs", 0.6, *flags, "--save", tmp_path / str(want))
        assert code == 0, err
        assert made[-1] == want
    code, _, err = cli(capsys, "search", "--round-to", 0, "--save", tmp_path / "x")
    assert_one_line_error(code, err, "--round-to 0 must be at least 1")


@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_a_solve_from_the_last_epochs_ratio_finds_what_a_cold_solve_finds(name, metric, monkeypatch):
    from earlybird import budget

    model, x = _dense(name)
    layers = prunable_layers(model, x)
    ties = channel_ties(model, x)
    g = torch.Generator().manual_seed(0)
    scores = dict(zip(layers, BNScale().scores(model, layers)))
    built = []
    plan = budget.pruned_architecture
    monkeypatch.setattr(budget, "pruned_architecture", lambda *a, **k: built.append(1) or plan(*a, **k))
    cold = solve_budget(model, scores, x, metric, 0.5, ties, round_to=8)
    assert len(built) == 13
    built.clear()  # scores that did not move: two candidates, the answer and the one below it
    assert solve_budget(model, scores, x, metric, 0.5, ties, round_to=8, near=cold.ratio).ratio == cold.ratio
    assert len(built) == 2
    for epoch in range(4):  # the scores move a little each epoch, and the ratio that meets the budget with them
        scores = {k: v * (1 + 0.05 * torch.randn(v.shape, generator=g)) for k, v in scores.items()}
        fresh = solve_budget(model, scores, x, metric, 0.5, ties, round_to=8)
        for near in (cold.ratio, 0.01, 0.99):  # last epoch's ratio, and starts far off on either side
            warm = solve_budget(model, scores, x, metric, 0.5, ties, round_to=8, near=near)
            assert (warm.ratio, warm.reached) == (fresh.ratio, fresh.reached)
            assert all(torch.equal(warm.masks[k], fresh.masks[k]) for k in fresh.masks)
        cold = fresh
    with pytest.raises(PruneError, match="cannot be met"):  # an unreachable budget says so from any start
        solve_budget(model, scores, x, metric, 1e-4, ties, round_to=8, near=0.3)
