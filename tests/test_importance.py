"""The seams of the method: channel importance criteria and Early-Bird rules."""
import json

import pytest
import torch
from torch import nn

from earlybird import ConfigError, EarlyBird, prune_model
from earlybird.importance import IMPORTANCES, BNScale, FilterNorm, Importance
from earlybird.masks import channel_mask
from earlybird.prune import channel_producers
from earlybird.rules import Chain, Star

from test_detector import TwoBN, half_mask, set_mask


class Residual(nn.Module):
    """conv-BN, then a block whose second conv adds into the stream the first one made."""

    def __init__(self, c=8):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv0(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        return self.head(x.mean((2, 3)))


def test_filter_norm_is_the_norm_of_every_producing_filter():
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(2, 3, 8, 8)
    producers = channel_producers(model, x)
    assert set(producers["bn1"]) == {"conv1"}
    assert set(producers["bn0"]) == {"conv0", "conv2"} == set(producers["bn2"])  # one residual stream
    scores = dict(zip(["bn0", "bn1", "bn2"], FilterNorm().bind(model, x).scores(model, ["bn0", "bn1", "bn2"])))
    norm = {n: model.get_submodule(n).weight.detach().flatten(1).pow(2).sum(1) for n in ("conv0", "conv1", "conv2")}
    assert torch.allclose(scores["bn1"], norm["conv1"].sqrt())
    assert torch.allclose(scores["bn0"], (norm["conv0"] + norm["conv2"]).sqrt())
    assert torch.equal(BNScale().scores(model, ["bn1"])[0], model.bn1.weight.detach().abs())


def test_a_second_criterion_draws_a_different_ticket():
    torch.manual_seed(0)
    model, x = Residual(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # BN scales rank the channels one way, the filters of conv1 the other
        model.bn1.weight.copy_(torch.arange(1, 9.0))
        model.conv1.weight.mul_(torch.arange(8, 0, -1.0).view(8, 1, 1, 1) / model.conv1.weight.flatten(1).norm(dim=1)
                                .view(8, 1, 1, 1))
    tickets = {}
    for importance in (BNScale(), FilterNorm().bind(model, x)):
        det = EarlyBird(model, [0.25], window=2, threshold=0.0, layers=["bn1"], importance=importance)
        assert det.step(1) == [] and det.step(2) == [0.25]
        tickets[importance.name] = det.tickets[0.25]
    assert tickets["bn-scale"].tolist() == [False, False] + [True] * 6  # the two smallest gammas go
    assert tickets["filter-l2"].tolist() == [True] * 6 + [False, False]  # the two weakest filters go
    # the engine's --round-to gives back by the same scores: the strongest filter of the removed ones
    small, plan = prune_model(model, {"bn1": tickets["filter-l2"]}, x, round_to=7,
                              scores={"bn1": FilterNorm().bind(model, x).scores(model, ["bn1"])[0]})
    assert plan.keep["bn1"] == [0, 1, 2, 3, 4, 5, 6]


def test_a_users_own_criterion_goes_through_the_library_api():
    class Reversed(Importance):  # the channels network slimming would remove are kept, and the other way round
        name = "reversed"

        def scores(self, model, layers):
            return [1 / (1e-6 + model.get_submodule(n).weight.detach().abs()) for n in layers]

    model = TwoBN(20)
    keep = half_mask(20, range(10))
    set_mask(model, keep, seed=0)
    det = EarlyBird(model, [0.5], window=2, threshold=0.0, min_channels=0, importance=Reversed())
    det.step(1), det.step(2)
    assert torch.equal(det.tickets[0.5], ~keep)
    assert det.state_dict()["importance"] == "reversed"


def test_a_criterion_must_be_bound_and_named():
    model = TwoBN(20)
    with pytest.raises(ConfigError, match="bind"):
        EarlyBird(model, [0.5], importance="filter-l2").step(1)
    with pytest.raises(ConfigError, match="unknown --importance .size.*bn-scale, filter-l2"):
        EarlyBird(model, [0.5], importance="size")
    with pytest.raises(ConfigError, match="unknown --eb-rule 'ring'"):
        EarlyBird(model, [0.5], rule="ring")
    assert list(IMPORTANCES) == ["bn-scale", "filter-l2"]


def test_filter_norm_refuses_a_bn_that_no_layer_produces():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    importance = FilterNorm().bind(model, torch.randn(2, 3, 4, 4))
    assert importance.scores(model, ["2"])[0].shape == (4,)
    with pytest.raises(ConfigError, match="use --importance bn-scale"):
        importance.scores(model, ["0"])


def drifting_masks(n=40, epochs=10):
    """Every epoch swaps one kept and one pruned channel: 0.05 per step, 0.2 across five masks."""
    kept, out = list(range(20)), []
    for epoch in range(1, epochs + 1):
        kept = kept[1:] + [19 + epoch]
        out.append(half_mask(n, kept))
    return out


def test_chain_rule_accepts_the_slow_drift_that_the_star_rule_refuses():
    model = TwoBN(40)
    fired = {}
    for rule in ("star", "chain"):
        det = EarlyBird(model, ratios=[0.5], window=5, threshold=0.1, rule=rule)
        for epoch, keep in enumerate(drifting_masks(), start=1):
            set_mask(model, keep, seed=epoch)
            det.step(epoch)
        fired[rule] = det.emerged.get(0.5)
        assert det.distances[0.5] == (pytest.approx([0.2, 0.15, 0.1, 0.05]) if rule == "star" else
                                      pytest.approx([0.05] * 4))
    assert fired == {"star": None, "chain": 5}  # the first full window: four steps of 0.05


def test_rules_measure_with_mask_distance():
    masks = drifting_masks(epochs=3)
    assert Star().distances(masks) == [0.1, 0.05]
    assert Chain().distances(masks) == [0.05, 0.05]
    assert Chain().settled([0.05, 0.1], 0.1) and not Star().settled([0.1000001], 0.1)


def test_channel_mask_ranks_by_whatever_scores_it_gets():
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5])
    assert channel_mask(scores, 0.5, [4]).tolist() == [True, False, True, False]


def test_search_prune_and_report_follow_the_chosen_criterion_and_rule(capsys, tmp_path, cifar10_root):
    from test_cli import TINY, cli

    from earlybird.report import load_run
    from earlybird.train import load_checkpoint, model_from_checkpoint

    save = tmp_path / "run"
    code, out, err = cli(capsys, "search", "--dataset", "cifar10", "--data", cifar10_root, "--no-download", *TINY,
                         "--epochs", 6, "--schedule", 4, "--ratios", 0.5, "--eb-window", 3, "--eb-threshold", 0.5, "--importance",
                         "filter-l2", "--eb-rule", "chain", "--save", save)
    assert code == 0, err
    summary = json.loads((save / "summary.json").read_text())
    assert (summary["importance"], summary["rule"]) == ("filter-l2", "chain")
    ticket_path = save / summary["tickets"]["0.5"]["path"]
    ticket = load_checkpoint(ticket_path, ("ticket",))
    assert ticket["importance"] == "filter-l2"
    # the report recomputes the search's masks and the rule's distances exactly as the detector did
    run = load_run(save)
    assert run.rule.name == "chain" and run.importance == "filter-l2"
    epoch = summary["tickets"]["0.5"]["epoch"]
    assert torch.equal(run.masks(0.5)[epoch - 1], ticket["mask"])
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [m["distances"]["0.5"] for m in metrics] == [[round(d, 4) for d in ds] for ds in run.window_distances(0.5)]
    # prune --percent ranks by the ticket's criterion: its mask is the filter norms' mask
    dense, _, _ = model_from_checkpoint(ticket, ticket_path)
    layers = ticket["layers"]
    scores = torch.cat(FilterNorm().bind(dense, torch.randn(2, 3, 32, 32)).scores(dense, layers))
    sizes = [dense.get_submodule(n).weight.numel() for n in layers]
    want = channel_mask(scores, 0.4, sizes)
    code, _, err = cli(capsys, "prune", "--model", ticket_path, "--data", cifar10_root, "--percent", 0.4,
                       "--round-to", 1, "--latency-batches", "--save", tmp_path / "p40")
    assert code == 0, err
    pruned = load_checkpoint(tmp_path / "p40" / "pruned.pth")
    kept = pruned["plan"]["keep"]
    assert sum(len(kept[n]) for n in layers) == int(want.sum())
    assert torch.cat([torch.isin(torch.arange(s), torch.tensor(kept[n])) for n, s in zip(layers, sizes)]).equal(want)
