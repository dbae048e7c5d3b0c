"""Masks reach the requested sparsity exactly and respect protection and minimum sizes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jpq_core.errors import JPQError
from jpq_core.pruning import agp_sparsity, make_masks, sparsity_of

shapes_st = st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8), st.sampled_from([1, 3])), min_size=1, max_size=5)


def _problem(shape_list, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {f"l{i}": torch.Size((o, c, k, k)) for i, (o, c, k) in enumerate(shape_list)}
    scores = {k: torch.rand(s, generator=g) for k, s in shapes.items()}
    return scores, shapes


@settings(max_examples=60, deadline=None)
@given(shapes_st, st.floats(0.0, 0.999), st.integers(0, 1000))
def test_global_sparsity_is_exact_and_no_layer_is_emptied(shape_list, sparsity, seed):
    scores, shapes = _problem(shape_list, seed)
    total = sum(s.numel() for s in shapes.values())
    target = round(sparsity * total)
    if target > total - len(shapes):
        with pytest.raises(JPQError):
            make_masks(scores, shapes, sparsity)
        return
    masks = make_masks(scores, shapes, sparsity)
    assert sum(int((~m).sum()) for m in masks.values()) == target
    assert all(int(m.sum()) >= 1 for m in masks.values())
    # a global threshold: every pruned score is at most every kept score (min_keep reservations aside)
    reserved = {k: scores[k].flatten().argmax() for k in shapes}
    pruned = torch.cat([scores[k][~masks[k]] for k in shapes])
    kept = torch.cat([torch.cat([scores[k][masks[k]].flatten()]) for k in shapes])
    kept_free = torch.cat([scores[k].flatten()[masks[k].flatten() & (torch.arange(scores[k].numel()) != reserved[k])] for k in shapes])
    if pruned.numel() and kept_free.numel():
        assert pruned.max() <= kept_free.min()
    assert kept.numel() == total - target


@settings(max_examples=40, deadline=None)
@given(shapes_st, st.floats(0.0, 0.999), st.integers(0, 1000))
def test_uniform_gives_each_layer_the_same_sparsity(shape_list, sparsity, seed):
    scores, shapes = _problem(shape_list, seed)
    masks = make_masks(scores, shapes, sparsity, allocation="uniform")
    for k, s in shapes.items():
        expected = min(round(sparsity * s.numel()), s.numel() - 1)
        assert int((~masks[k]).sum()) == expected


def test_protected_layers_stay_dense_and_others_take_the_load():
    shapes = {"first": torch.Size((4, 3, 3, 3)), "mid": torch.Size((8, 4, 3, 3)), "last": torch.Size((2, 8, 1, 1))}
    scores = {k: torch.rand(s) for k, s in shapes.items()}
    masks = make_masks(scores, shapes, 0.5, protect={"first", "last"})
    assert masks["first"].all() and masks["last"].all()
    total = sum(s.numel() for s in shapes.values())
    assert sparsity_of(masks) == pytest.approx(round(0.5 * total) / total)
    with pytest.raises(JPQError, match="lower the sparsity or protect fewer"):
        make_masks(scores, shapes, 0.9, protect={"first", "last"})


def test_sparsity_out_of_range_is_refused():
    shapes = {"a": torch.Size((2, 2))}
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(JPQError, match=r"sparsity must be in \[0, 1\)"):
            make_masks({"a": torch.rand(2, 2)}, shapes, bad)


def test_extreme_sparsity_keeps_a_weight_per_layer_unless_asked_not_to():
    shapes = {"a": torch.Size((10, 10)), "b": torch.Size((1000,))}
    scores = {"a": torch.zeros(10, 10), "b": torch.ones(1000)}  # a global threshold would wipe out 'a' first
    masks = make_masks(scores, shapes, 0.99)
    assert int(masks["a"].sum()) == 1 and sparsity_of(masks) == pytest.approx(0.99)
    masks = make_masks(scores, shapes, 100 / 1100, min_keep=0)
    assert int(masks["a"].sum()) == 0 and masks["b"].all()


def test_per_channel_scores_are_sent_to_the_channel_module():
    with pytest.raises(JPQError, match="jpq_core.channels"):
        make_masks({"a": torch.rand(4)}, {"a": torch.Size((4, 2, 3, 3))}, 0.5)


def test_agp_schedule_is_cubic_and_monotone():
    values = [agp_sparsity(t, 100, 0.9) for t in range(0, 101, 10)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.9)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert agp_sparsity(50, 100, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))


def test_the_linear_time_selection_removes_what_a_stable_sort_would():
    """Masks are chosen by selection (kthvalue), not a full sort: the same weights, ties by position, also with
    infinite (reserved) and NaN scores."""
    from jpq_core.pruning import _lowest

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 40, (1,), generator=g))
        x = torch.randint(-3, 4, (n,), generator=g).double()
        x[torch.rand(n, generator=g) < 0.2] = float("inf")
        if trial % 3 == 0:
            x[torch.rand(n, generator=g) < 0.1] = float("nan")
        for highest in (False, True):
            for count in range(n + 1):
                expected = torch.zeros(n, dtype=torch.bool)
                expected[torch.argsort(x, descending=highest, stable=True)[:count]] = True
                assert torch.equal(_lowest(x, count, highest), expected)
