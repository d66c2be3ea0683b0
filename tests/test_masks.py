import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from earlybird import ConfigError, channel_mask, channel_masks, distance_matrix, mask_distance


def test_global_threshold_prunes_the_smallest_gammas():
    g = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    keep = channel_mask(g, 0.5, [3, 3])
    assert keep.tolist() == [True, False, True, False, True, False]


def test_ties_are_broken_by_position():
    keep = channel_mask(torch.full((6,), 0.5), 0.5, [6])
    assert keep.tolist() == [False, False, False, True, True, True]


def test_collapse_guard_keeps_the_largest_channel_of_an_emptied_layer():
    # Layer 0 has the three smallest gammas: a 50% global cut would empty it.
    g = torch.tensor([0.01, 0.03, 0.02, 0.9, 0.8, 0.7])
    keep = channel_mask(g, 0.5, [3, 3], min_channels=1)
    assert keep.tolist() == [False, True, False, True, True, True]
    assert channel_mask(g, 0.5, [3, 3], min_channels=0)[:3].sum() == 0
    assert channel_mask(g, 0.5, [3, 3], min_channels=2)[:3].tolist() == [False, True, True]


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_unit_interval_is_refused(ratio):
    with pytest.raises(ConfigError, match="outside"):
        channel_mask(torch.rand(10), ratio, [10])


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5), ratio=st.floats(0.01, 0.99),
       seed=st.integers(0, 10_000), min_channels=st.integers(0, 3))
def test_mask_properties(sizes, ratio, seed, min_channels):
    g = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(seed))
    keep = channel_mask(g, ratio, sizes, min_channels)
    n = sum(sizes)
    pruned = n - int(keep.sum())
    assert pruned <= math.floor(n * ratio)
    start = 0
    guarded = False
    for s in sizes:
        layer = keep[start:start + s]
        assert int(layer.sum()) >= min(min_channels, s)
        guarded |= int(channel_mask(g, ratio, sizes, 0)[start:start + s].sum()) < min(min_channels, s)
        start += s
    if not guarded:
        assert pruned == math.floor(n * ratio)
        # every kept gamma is >= every pruned gamma
        if 0 < pruned < n:
            assert g[keep].min() >= g[~keep].max()


def test_distance_is_normalized_hamming():
    a = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    b = a.clone()
    b[[0, 3]] = ~b[[0, 3]]
    assert mask_distance(a, a) == 0.0
    assert mask_distance(a, b) == pytest.approx(0.2)
    assert mask_distance(a, ~a) == 1.0
    with pytest.raises(ValueError):
        mask_distance(a, a[:5])


def test_distance_matrix_matches_pairwise_distances():
    masks = [torch.rand(50, generator=torch.Generator().manual_seed(i)) > 0.5 for i in range(4)]
    m = distance_matrix(masks)
    for i in range(4):
        for j in range(4):
            assert m[i, j].item() == pytest.approx(mask_distance(masks[i], masks[j]), abs=1e-6)


def test_channel_masks_reads_every_bn_of_a_model(small_vgg):
    masks = channel_masks(small_vgg, [0.3, 0.7])
    n = sum(m.num_features for m in small_vgg.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert set(masks) == {0.3, 0.7}
    assert all(m.numel() == n for m in masks.values())
    assert masks[0.7].sum() < masks[0.3].sum()


def test_tied_channels_are_ranked_and_removed_as_one():
    from earlybird.masks import ChannelIndex, channel_mask

    ties = ChannelIndex(("a", "b"), (4, 2)).flat_ties([[("a", 0), ("a", 2)], [("b", 1), ("x", 0)]])
    assert ties == [[0, 2]]  # other layers' channels dropped, and a list left with one position
    gammas = torch.tensor([0.1, 0.5, 0.9, 0.6, 0.7, 0.8])
    # alone, channel 0 (0.1) and channel 1 (0.5) go; tied, 0 and 2 rank as 0.5 and go together with 1
    assert channel_mask(gammas, 2 / 6, [4, 2]).tolist() == [False, False, True, True, True, True]
    assert channel_mask(gammas, 3 / 6, [4, 2], ties=ties).tolist() == [False, False, False, True, True, True]


def test_the_threshold_prunes_exactly_int_n_p_where_the_reference_prunes_one_more():
    # the reference: thre = sorted(|g|)[int(N p)], keep |g| > thre: int(N p) + 1 channels go (more on ties)
    def reference(g, p):
        return g > torch.sort(g).values[int(g.numel() * p)]

    g = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert (~channel_mask(g, 0.3, [10], min_channels=0)).sum() == 3  # earlybird: int(10 x 0.3)
    assert (~reference(g, 0.3)).sum() == 4
    tied = torch.tensor([0.5, 0.2, 0.1, 0.2, 0.2, 0.9, 0.8, 0.7, 0.6, 1.0])
    # ties go by position: of the three 0.2s, the first; the reference drops all three
    assert channel_mask(tied, 0.2, [10], min_channels=0).tolist() == [
        True, False, False, True, True, True, True, True, True, True]
    assert (~reference(tied, 0.2)).sum() == 4
