import io

import pytest
import torch
from torch import nn

from earlybird import ConfigError, EarlyBird
from earlybird.detector import position


class TwoBN(nn.Module):
    def __init__(self, n=20):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(n // 2)
        self.bn2 = nn.BatchNorm2d(n // 2)


def set_mask(model, keep: torch.Tensor, seed: int):
    """Set gammas so that the 50% mask is exactly ``keep`` (kept ~1, pruned ~0.1, jittered)."""
    g = torch.Generator().manual_seed(seed)
    gam = torch.where(keep, 1.0, 0.1) + torch.rand(keep.numel(), generator=g) * 0.01
    with torch.no_grad():
        model.bn1.weight.copy_(gam[: keep.numel() // 2])
        model.bn2.weight.copy_(gam[keep.numel() // 2 :])


def half_mask(n, kept_idx):
    keep = torch.zeros(n, dtype=torch.bool)
    keep[list(kept_idx)] = True
    return keep


def test_fires_exactly_when_the_window_has_settled():
    model = TwoBN(20)
    det = EarlyBird(model, ratios=[0.5], window=5, threshold=0.1)
    stable = half_mask(20, [0, 2, 4, 6, 8, 11, 13, 15, 17, 19])
    sequence = [~stable, stable.roll(3), ~stable] + [stable] * 8  # epochs 1..11; settled from epoch 4
    fired = []
    for epoch, keep in enumerate(sequence, start=1):
        set_mask(model, keep, seed=epoch)
        if det.step(epoch):
            fired.append(epoch)
    # masks of epochs 4..8 are the first full window of equal masks
    assert fired == [8]
    assert det.emerged == {0.5: 8}
    assert torch.equal(det.tickets[0.5], stable)
    assert det.done


def test_star_rule_ignores_slow_drift_that_a_chain_rule_would_accept():
    n = 40
    model = TwoBN(n)
    det = EarlyBird(model, ratios=[0.5], window=5, threshold=0.1)
    kept = list(range(0, 20))
    fired = []
    for epoch in range(1, 11):  # every epoch swaps one kept and one pruned channel: distance 0.05 per step
        kept = kept[1:] + [19 + epoch]
        set_mask(model, half_mask(n, kept), seed=epoch)
        if det.step(epoch):
            fired.append(epoch)
        if epoch >= 2:
            assert det.distances[0.5][-1] == pytest.approx(0.05)
    assert fired == []  # newest vs four epochs back differs by 0.2
    for epoch in range(11, 16):  # drift stops at epoch 10's mask
        set_mask(model, half_mask(n, kept), seed=epoch)
        if det.step(epoch):
            fired.append(epoch)
    # epoch 11: window 7..11, mask 7 is three swaps (0.15) from the rest; epoch 12: mask 8 is two
    # swaps (exactly 0.1, which counts as settled) from masks 10..12.
    assert fired == [12]


def set_gammas(model, values):
    values = torch.as_tensor(values, dtype=torch.float)
    with torch.no_grad():
        model.bn1.weight.copy_(values[:10])
        model.bn2.weight.copy_(values[10:])


def test_ratios_fire_independently_and_step_reports_only_new_ones():
    model = TwoBN(20)
    det = EarlyBird(model, ratios=[0.5, 0.25], window=2, threshold=0.0)
    base = torch.arange(1, 21, dtype=torch.float)  # 0.25 prunes channels 0-4, 0.5 prunes 0-9
    set_gammas(model, base)
    assert det.step(1) == []
    shuffled = base.clone()
    shuffled[[0, 7]] = shuffled[[7, 0]]  # moves a channel across the 0.25 cut, not across the 0.5 cut
    set_gammas(model, shuffled)
    assert det.step(2) == [0.5]
    set_gammas(model, shuffled)
    assert det.step(3) == [0.25]
    assert det.step(4) == []
    assert det.emerged == {0.5: 2, 0.25: 3}


def test_state_dict_roundtrip_resumes_identically():
    stable = half_mask(20, [1, 3, 5, 7, 9, 10, 12, 14, 16, 18])
    seq = [stable.roll(i) for i in range(4)] + [stable] * 6

    def run(split=None):
        model = TwoBN(20)
        det = EarlyBird(model, ratios=[0.5, 0.3], window=4, threshold=0.1)
        for epoch, keep in enumerate(seq, start=1):
            set_mask(model, keep, epoch)
            det.step(epoch)
            if epoch == split:
                buf = io.BytesIO()
                torch.save(det.state_dict(), buf)
                buf.seek(0)
                det = EarlyBird(model, ratios=[0.5, 0.3], window=4, threshold=0.1)
                det.load_state_dict(torch.load(buf, weights_only=True))
        return det.emerged

    assert run() == run(split=5)
    assert run()[0.5] == 8  # masks of epochs 5..8 are the first window of 4 equal masks


def test_state_dict_from_other_settings_is_refused():
    model = TwoBN(20)
    state = EarlyBird(model, ratios=[0.5], window=5).state_dict()
    with pytest.raises(ConfigError, match="resume with the flags"):
        EarlyBird(model, ratios=[0.5], window=4).load_state_dict(state)


@pytest.mark.parametrize("kwargs", [{"window": 1}, {"threshold": 1.5}, {"ratios": [1.2]}, {"ratios": []}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        EarlyBird(TwoBN(20), **kwargs)


def test_a_model_without_batch_norm_is_refused():
    with pytest.raises(ConfigError, match="batch-norm"):
        EarlyBird(nn.Sequential(nn.Linear(2, 2)))


def test_the_closest_window_is_kept_for_advice():
    from test_importance import drifting_masks

    model = TwoBN(40)
    det = EarlyBird(model, ratios=[0.5], window=3, threshold=0.01)
    for epoch, keep in enumerate(drifting_masks(epochs=6), start=1):
        set_mask(model, keep, seed=epoch)
        det.step(epoch)
    # every full window drifts 0.1 from its newest mask back to its oldest: the first one counts
    assert det.emerged == {} and det.closest == {0.5: (pytest.approx(0.1), 3)}
    restored = EarlyBird(model, ratios=[0.5], window=3, threshold=0.01)
    restored.load_state_dict(det.state_dict())
    assert restored.closest == det.closest


def drift(n: int, swaps_per_epoch: float, interval: float, draws: int, unscaled: bool = False) -> list[float]:
    """Where a 50% ticket emerges while the masks drift at a steady rate: one kept and one pruned
    channel of ``n`` swap places ``swaps_per_epoch`` times an epoch, drawn every ``interval``."""
    model = TwoBN(n)
    # unscaled: a detector told the draws are an epoch apart (0.1 between any two of them)
    det = EarlyBird(model, ratios=[0.5], window=5, interval=1.0 if unscaled else interval)
    for k in range(1, draws + 1):
        swaps = int(k * interval * swaps_per_epoch + 1e-9)
        kept = list(range(swaps, n // 2 + swaps))
        set_mask(model, half_mask(n, kept), seed=k)
        det.step(position(k * interval))
    return det.emerged.get(0.5)


@pytest.mark.parametrize("interval", [1.0, 0.5, 0.25, 0.1])
def test_the_threshold_is_a_rate_that_means_the_same_at_every_interval(interval):
    # one swap moves 2 of 400 channels: 0.005. The star rule bounds the distance across the window
    # (4 intervals) by 0.1 x interval: a drift of 0.025 per epoch (5 swaps) passes, a faster one not
    draws = round(6 / interval)
    first_full = position(5 * interval)
    assert drift(400, 1, interval, draws) == first_full  # 0.005 per epoch: settled from the start
    assert drift(400, 10, interval, draws) is None  # 0.05 per epoch: still moving, at every interval
    if interval < 0.5:  # unscaled, the fast drift "settles" as soon as the window is full
        assert drift(400, 10, interval, draws, unscaled=True) == first_full


def test_steps_default_to_the_interval_and_count_in_epochs():
    model = TwoBN(20)
    det = EarlyBird(model, ratios=[0.5], window=2, interval=0.25)
    set_mask(model, half_mask(20, range(10)), seed=0)
    assert det.step() == [] and det.step() == [0.5]
    assert det.emerged == {0.5: 0.5} and det.bound == pytest.approx(0.025)
    whole = EarlyBird(model, ratios=[0.5], window=2)
    whole.step(), whole.step()
    assert whole.emerged == {0.5: 2} and isinstance(whole.emerged[0.5], int)  # whole epochs stay ints
    with pytest.raises(ConfigError, match="interval"):
        EarlyBird(model, ratios=[0.5], interval=0)
    with pytest.raises(ConfigError, match="resume with the flags"):
        EarlyBird(model, ratios=[0.5], window=2).load_state_dict(det.state_dict())  # another interval
