"""SHiRA masks: exact budgets, reproducibility, what each kind picks, MoSA split, bad input."""
import pytest
import torch

from shira_kernels import masks
from shira_kernels.formats import flat_index_dtype
from shira_kernels.masks import (budget, grad_mask, make_mask, mask_to_indices, rand_mask,
                                 snip_mask, split_mask, struct_mask, wm_mask)

# (shape, budget kwargs, expected count): odd shapes, both conventions.
BUDGETS = [
    ((7, 13), {"r": 1}, 20),
    ((7, 13), {"r": 3}, 60),
    ((7, 13), {"density": 0.5}, round(0.5 * 91)),
    ((7, 13), {"density": 1.0}, 91),
    ((1, 5), {"r": 1}, 6),  # r·(out+in) = 6 > 5: dropped from FITTING, see test_budget_does_not_fit
    ((1, 5), {"density": 0.4}, 2),
    ((13, 7), {"density": 0.01}, 1),
    ((33, 4097), {"r": 8}, 8 * (33 + 4097)),
    ((33, 4097), {"density": 0.3}, round(0.3 * 33 * 4097)),
]
FITTING = [b for b in BUDGETS if b[2] <= b[0][0] * b[0][1]]


def kwargs_id(b):
    (o, i), kw, _ = b
    return f"{o}x{i}-" + ",".join(f"{k}={v}" for k, v in kw.items())


def randn(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# budget
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", FITTING, ids=kwargs_id)
def test_budget_counts(case):
    shape, kw, expected = case
    assert budget(shape, **kw) == expected
    assert budget(torch.Size(shape), **kw) == expected


@pytest.mark.parametrize("shape,kw,match", [
    ((16, 16), {"r": 32}, r"r=32 asks for 1024 entries but a 16x16 weight has 256"),
    ((1, 5), {"r": 1}, r"asks for 6 entries but a 1x5 weight has 5"),
    ((7, 13), {"density": 1e-4}, r"asks for 0 entries"),
])
def test_budget_does_not_fit(shape, kw, match):
    with pytest.raises(ValueError, match="does not fit"):
        budget(shape, **kw)
    with pytest.raises(ValueError, match=match):
        budget(shape, **kw)


@pytest.mark.parametrize("kw,match", [
    ({}, r"exactly one of r= or density=.*neither"),
    ({"r": 1, "density": 0.5}, r"exactly one of r= or density=.*both"),
    ({"r": 0}, r"r must be a positive int"),
    ({"r": -2}, r"r must be a positive int"),
    ({"r": 1.5}, r"r must be a positive int"),
    ({"r": True}, r"r must be a positive int"),
    ({"density": 0.0}, r"density must be a float in \(0, 1\]"),
    ({"density": 1.5}, r"density must be a float in \(0, 1\]"),
    ({"density": float("nan")}, r"density must be a float in \(0, 1\]"),
    ({"density": "0.5"}, r"density must be a float in \(0, 1\]"),
])
def test_budget_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        budget((7, 13), **kw)


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), (0, 4), (3, -1), "ab"])
def test_budget_bad_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        budget(shape, r=1)


# ---------------------------------------------------------------------------------------------
# Every kind: exact count, bool, shape, device.
# ---------------------------------------------------------------------------------------------
def build(kind, shape, kw, seed=0):
    weight = randn(shape, seed=100 + seed)
    grads = [randn(shape, seed=200 + seed), randn(shape, seed=300 + seed)]
    return make_mask(kind, weight, seed=seed, grads=grads, **kw)


@pytest.mark.parametrize("case", FITTING, ids=kwargs_id)
@pytest.mark.parametrize("kind", masks.KINDS)
def test_exact_count(kind, case):
    shape, kw, expected = case
    mask = build(kind, shape, kw)
    assert mask.dtype == torch.bool and mask.shape == shape and mask.device.type == "cpu"
    assert int(mask.sum()) == expected


@pytest.mark.parametrize("kind", masks.KINDS)
def test_low_precision_weights(kind):
    weight = randn((9, 11)).to(torch.bfloat16)
    grads = [randn((9, 11)).to(torch.float16)]
    mask = make_mask(kind, weight, r=2, grads=grads)
    assert int(mask.sum()) == 40


@pytest.mark.parametrize("kind", ["rand", "struct"])
def test_seeded_determinism(kind):
    shape, kw = (24, 40), {"r": 3}
    fn = rand_mask if kind == "rand" else struct_mask
    a, b, c = fn(shape, seed=5, **kw), fn(shape, seed=5, **kw), fn(shape, seed=6, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(c.sum()) == int(a.sum()) == 3 * 64


@pytest.mark.parametrize("kind", ["wm", "grad", "snip"])
def test_scored_determinism(kind):
    shape, kw = (24, 40), {"density": 0.2}
    assert torch.equal(build(kind, shape, kw), build(kind, shape, kw))


def test_rand_sparse_and_dense_paths_are_uniform_enough():
    # Sparse budget (iid draws) and dense budget (randperm): each entry is picked about
    # count/numel of the time over many seeds.
    for kw, shape in [({"density": 0.05}, (20, 20)), ({"density": 0.6}, (20, 20))]:
        hits = sum(rand_mask(shape, seed=s, **kw).float() for s in range(200))
        p = budget(shape, **kw) / 400
        assert abs(hits.mean().item() / 200 - p) < 1e-6
        assert (hits / 200 - p).abs().max().item() < 0.2


def test_tensor_shape_argument():
    weight = randn((6, 10))
    assert torch.equal(rand_mask(weight, r=1, seed=3), rand_mask((6, 10), r=1, seed=3))
    assert torch.equal(struct_mask(weight, r=1, seed=3), struct_mask((6, 10), r=1, seed=3))


# ---------------------------------------------------------------------------------------------
# SHiRA-Struct
# ---------------------------------------------------------------------------------------------
def struct_parts(mask):
    d = min(mask.shape)
    diag = torch.zeros_like(mask)
    diag[torch.arange(d), torch.arange(d)] = True
    full_rows = mask.all(dim=1)
    full_cols = mask.all(dim=0)
    rest = mask & ~diag & ~full_rows[:, None] & ~full_cols[None, :]
    return diag, full_rows, full_cols, rest


@pytest.mark.parametrize("shape,kw", [((16, 24), {"r": 4}), ((24, 16), {"r": 4}),
                                      ((7, 13), {"r": 2}), ((33, 50), {"density": 0.37}),
                                      ((5, 1), {"density": 0.8})])
@pytest.mark.parametrize("seed", [0, 1])
def test_struct_structure(shape, kw, seed):
    mask = struct_mask(shape, seed=seed, **kw)
    assert int(mask.sum()) == budget(shape, **kw)
    diag, full_rows, full_cols, rest = struct_parts(mask)
    assert mask[diag].all(), "the diagonal comes first"
    # Whatever is neither diagonal nor a whole line lies in one partial row or column.
    rows, cols = torch.nonzero(rest, as_tuple=True)
    assert rows.unique().numel() <= 1 or cols.unique().numel() <= 1


def test_struct_has_whole_rows_and_columns():
    # 16x24, r=4: 160 entries = diagonal (16) + row (23 new) + column (14 new) + ... .
    mask = struct_mask((16, 24), r=4, seed=0)
    _, full_rows, full_cols, _ = struct_parts(mask)
    assert full_rows.sum() >= 2 and full_cols.sum() >= 2
    # Rows and columns alternate, so their numbers differ by at most one (plus a partial line).
    assert abs(int(full_rows.sum()) - int(full_cols.sum())) <= 1


def test_struct_budget_below_diagonal():
    # 40x40 at density 0.01 is 16 entries, fewer than the 40 on the diagonal.
    mask = struct_mask((40, 40), density=0.01, seed=2)
    assert int(mask.sum()) == 16
    assert torch.equal(mask, torch.diag(torch.diagonal(mask)))


# ---------------------------------------------------------------------------------------------
# SHiRA-WM, -Grad, -SNIP
# ---------------------------------------------------------------------------------------------
def test_wm_matches_topk():
    weight = randn((33, 47))
    k = budget(weight.shape, r=3)
    expected = torch.zeros(weight.numel(), dtype=torch.bool)
    expected[weight.abs().flatten().topk(k).indices] = True
    assert torch.equal(wm_mask(weight, r=3), expected.view_as(weight))


def test_wm_ties_go_to_lower_index():
    weight = torch.ones(4, 5)
    weight[3, 4] = -2.0  # the largest |W|, then 5 of the 19 tied ones in index order
    mask = wm_mask(weight, density=0.3)
    flat = mask_to_indices(mask).tolist()
    assert flat == [0, 1, 2, 3, 4, 19]


def test_grad_picks_largest_accumulated_abs():
    shape = (3, 4)
    g1, g2 = torch.zeros(shape), torch.zeros(shape)
    g1[0, 0], g2[0, 0] = 3.0, -3.0       # cancels in Σg, large in Σ|g|
    g1[1, 2], g2[1, 2] = 1.0, 1.5        # Σ|g| 2.5
    g1[2, 3] = -2.0                      # Σ|g| 2
    g2[2, 1] = 0.5
    mask = grad_mask(shape, [g1, g2], density=3 / 12)
    assert mask_to_indices(mask).tolist() == [0, 1 * 4 + 2, 2 * 4 + 3]
    # A weight tensor in place of the shape, a generator of grads, a single bare gradient.
    weight = torch.zeros(shape)
    assert torch.equal(grad_mask(weight, (g for g in [g1, g2]), density=0.25), mask)
    assert torch.equal(grad_mask(weight, g1 - g2, density=0.25), mask)


def test_snip_picks_largest_weight_times_gradient():
    shape = (3, 4)
    weight = torch.ones(shape)
    weight[2, 0] = 10.0
    g1, g2 = torch.zeros(shape), torch.zeros(shape)
    g1[0, 0], g2[0, 0] = 3.0, -3.0       # Σg = 0: SNIP ignores it, Grad would not
    g1[1, 1] = 2.0                       # |1 · 2| = 2
    g2[2, 0] = 0.5                       # |10 · 0.5| = 5
    g1[0, 3], g2[0, 3] = -1.0, -0.5      # |1 · -1.5| = 1.5
    mask = snip_mask(weight, [g1, g2], density=3 / 12)
    assert mask_to_indices(mask).tolist() == [3, 5, 8]
    assert mask[0, 0].item() is False
    assert grad_mask(weight, [g1, g2], density=3 / 12)[0, 0].item() is True


def test_nan_scores_rejected():
    weight = randn((4, 4))
    weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        wm_mask(weight, r=1)


@pytest.mark.parametrize("fn", [grad_mask, snip_mask])
def test_grads_bad(fn):
    weight = randn((4, 6))
    with pytest.raises(ValueError, match="grads is empty"):
        fn(weight, [], r=1)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(6, 4\) but the weight"):
        fn(weight, [torch.ones(4, 6), torch.ones(6, 4)], r=1)
    with pytest.raises(ValueError, match=r"grads\[0\] must be a tensor"):
        fn(weight, [[1.0] * 6] * 4, r=1)
    with pytest.raises(ValueError, match="grads must be an iterable"):
        fn(weight, 3.0, r=1)


# ---------------------------------------------------------------------------------------------
# make_mask
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,fn", [("rand", rand_mask), ("struct", struct_mask)])
def test_make_mask_dispatch_seeded(kind, fn):
    weight = randn((9, 14))
    assert torch.equal(make_mask(kind, weight, r=2, seed=4), fn((9, 14), r=2, seed=4))


def test_make_mask_dispatch_scored():
    weight, grads = randn((9, 14)), [randn((9, 14), seed=1)]
    assert torch.equal(make_mask("wm", weight, density=0.3), wm_mask(weight, density=0.3))
    assert torch.equal(make_mask("grad", weight, density=0.3, grads=grads),
                       grad_mask(weight, grads, density=0.3))
    assert torch.equal(make_mask("snip", weight, density=0.3, grads=grads),
                       snip_mask(weight, grads, density=0.3))


def test_make_mask_tensor_passthrough():
    weight = randn((5, 8))
    mask = rand_mask((5, 8), r=2, seed=1)
    assert torch.equal(make_mask(mask, weight), mask)
    assert torch.equal(make_mask(mask, weight, r=2), mask)
    with pytest.raises(ValueError, match=r"mask has 26 entries but r=1 asks for 13"):
        make_mask(mask, weight, r=1)
    with pytest.raises(ValueError, match=r"mask has shape \(8, 5\) but the weight has shape"):
        make_mask(mask.T.contiguous(), weight)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        make_mask(mask.float(), weight)


def test_make_mask_errors():
    weight = randn((5, 8))
    with pytest.raises(ValueError, match=r"unknown mask kind 'lora'.*rand, struct, wm, grad, snip"):
        make_mask("lora", weight, r=1)
    for kind in ("grad", "snip"):
        with pytest.raises(ValueError, match="needs grads"):
            make_mask(kind, weight, r=1)
    with pytest.raises(ValueError, match=r"weight must be 2-D \[out, in\], got shape \(40,\)"):
        make_mask("rand", weight.view(-1), r=1)
    with pytest.raises(ValueError, match=r"weight must be 2-D .*\(2, 4, 5\)"):
        wm_mask(weight.view(2, 4, 5), r=1)
    with pytest.raises(ValueError, match="exactly one of r= or density="):
        make_mask("wm", weight)
    with pytest.raises(ValueError, match="exactly one of r= or density="):
        make_mask("rand", weight, r=1, density=0.5)
    with pytest.raises(ValueError, match="does not fit"):
        make_mask("struct", weight, r=4)


# ---------------------------------------------------------------------------------------------
# split_mask, mask_to_indices
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_split_mask(k):
    mask = rand_mask((12, 25), density=0.5, seed=3)  # 150 entries
    parts = split_mask(mask, k, seed=1)
    assert len(parts) == k
    union = torch.zeros_like(mask)
    for part in parts:
        assert part.dtype == torch.bool and part.shape == mask.shape
        assert int(part.sum()) == 150 // k
        assert not (union & part).any(), "parts overlap"
        union |= part
    assert torch.equal(union, mask)
    assert all(torch.equal(a, b) for a, b in zip(parts, split_mask(mask, k, seed=1)))
    if k > 1:
        assert not torch.equal(parts[0], split_mask(mask, k, seed=2)[0])


def test_split_mask_errors():
    mask = rand_mask((12, 25), density=0.5, seed=3)
    with pytest.raises(ValueError, match=r"150 entries into k=4.*not divisible"):
        split_mask(mask, 4)
    for k in (0, -1, 2.0):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            split_mask(mask, k)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        split_mask(mask.int(), 2)


def test_mask_to_indices():
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[2, 1] = mask[0, 4] = mask[1, 0] = True
    index = mask_to_indices(mask)
    assert index.dtype == torch.int32
    assert index.tolist() == [4, 5, 11]
    # The width switches at 2**31 entries (such a mask is too big to build here).
    assert flat_index_dtype((2**16, 2**15)) == torch.int64
    assert flat_index_dtype((2**16, 2**15 - 1)) == torch.int32
    assert mask_to_indices(torch.ones(4, 4, dtype=torch.bool)).tolist() == list(range(16))
    with pytest.raises(ValueError, match="2-D"):
        mask_to_indices(torch.ones(4, dtype=torch.bool))
