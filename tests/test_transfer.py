"""sparse_diff, add_sparse and lora_to_sparse against dense references (masks.wm_mask ranks |W|
with the same tie rule), the error formula, the memory bound of the block-wise projection, and
bad arguments."""
import math
import time

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import shira_kernels
from shira_kernels import SparseDelta, lora_to_sparse, sparse_diff
from shira_kernels.masks import budget, mask_to_indices, wm_mask
from shira_kernels.transfer import add_sparse

from tolerance import abs64, assert_within_error_bound


def gen(seed):
    return torch.Generator().manual_seed(seed)


def dense_top(delta, **budget_kwargs):
    """Reference: the budget's largest |delta| entries of the dense matrix (ties to the lower
    index), and delta there."""
    idx = mask_to_indices(wm_mask(delta, **budget_kwargs))
    return idx, delta.reshape(-1)[idx.long()]


def state_dicts(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 16), nn.LayerNorm(16), nn.Linear(16, 8)).to(dtype)
    model.register_buffer("steps", torch.zeros(3, 3, dtype=torch.int64))  # 2-D but not float
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = {k: (v + 0.01 * torch.randn(v.shape, generator=gen(seed + 1)).to(v.dtype)
                 if v.is_floating_point() else v.clone()) for k, v in base.items()}
    return tuned, base


# ---------------------------------------------------------------------------------------------
# sparse_diff
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_diff_keeps_the_largest_changes_of_each_weight(dtype):
    tuned, base = state_dicts(dtype=dtype)
    for kwargs in ({"density": 0.1}, {"r": 2}):
        deltas = sparse_diff(tuned, base, **kwargs)
        assert set(deltas) == {"0.weight", "2.weight"}  # 2-D floating tensors only
        for name, d in deltas.items():
            full = tuned[name].float() - base[name].float()
            idx, vals = dense_top(full, **kwargs)
            assert d.shape == tuple(full.shape) and d.nnz == budget(full.shape, **kwargs)
            assert d.dtype == torch.float32
            assert torch.equal(d.flat_indices, idx) and torch.equal(d.values, vals)


def test_sparse_diff_breaks_ties_by_the_lower_index_and_honours_keys():
    base = {"w": torch.zeros(6, 5), "v": torch.zeros(4, 4), "b": torch.zeros(4)}
    tuned = {"w": torch.tensor([1.0, -1.0, 2.0, 0.0, 1.0] * 6).view(6, 5),
             "v": torch.ones(4, 4), "b": torch.ones(4)}
    d = sparse_diff(tuned, base, density=0.5, keys=["w"])
    assert list(d) == ["w"]
    idx, vals = dense_top(tuned["w"], density=0.5)
    assert torch.equal(d["w"].flat_indices, idx) and torch.equal(d["w"].values, vals)
    # The 6 entries equal to 2 come first, then the lowest-index nine of the twelve ±1 ties.
    assert d["w"].to_dense().abs().sum() == 6 * 2 + 9
    v = sparse_diff(tuned, base, density=0.25, keys="v")["v"]
    assert v.flat_indices.tolist() == [0, 1, 2, 3]


def test_sparse_diff_bad_arguments():
    tuned, base = state_dicts()
    with pytest.raises(ValueError, match="exactly one of r= or density="):
        sparse_diff(tuned, base)
    with pytest.raises(ValueError, match="exactly one of r= or density="):
        sparse_diff(tuned, base, density=0.1, r=1)
    with pytest.raises(KeyError, match="'missing'.*finetuned_state_dict"):
        sparse_diff(tuned, base, density=0.1, keys=["0.weight", "missing"])
    only_tuned = dict(tuned, extra=torch.zeros(3, 3))
    with pytest.raises(KeyError, match="'extra'.*base_state_dict"):
        sparse_diff(only_tuned, base, density=0.1, keys=["extra"])
    with pytest.raises(ValueError, match=r"finetuned_state_dict\['0.bias'\] must be a 2-D"):
        sparse_diff(tuned, base, density=0.1, keys=["0.bias"])
    with pytest.raises(ValueError, match="'steps'.*2-D floating-point"):
        sparse_diff(tuned, base, density=0.1, keys=["steps"])
    with pytest.raises(ValueError, match="keys is empty"):
        sparse_diff(tuned, base, density=0.1, keys=[])
    resized = dict(base, **{"0.weight": torch.zeros(17, 20)})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(16, 20\) in fine.*\(17, 20\)"):
        sparse_diff(tuned, resized, density=0.1)
    with pytest.raises(ValueError, match="no 2-D floating-point tensor"):
        sparse_diff({"b": torch.ones(3)}, {"b": torch.zeros(3)}, density=0.5)
    with pytest.raises(ValueError, match="'2.weight': budget does not fit"):
        sparse_diff(tuned, base, r=8)  # 8·(8+16) > 8·16 entries
    with pytest.raises(ValueError, match="NaN"):
        sparse_diff({"w": torch.full((2, 2), float("nan"))}, {"w": torch.zeros(2, 2)}, density=0.5)
    with pytest.raises(ValueError, match="base_state_dict must be a mapping"):
        sparse_diff(tuned, [1, 2], density=0.1)


def test_sparse_diff_rounds_a_float64_difference_once_and_names_an_overflow():
    # fp64 weights: the difference is taken in fp64 and rounded once to fp32 (rounding each
    # weight to fp32 first loses 1e-12, and makes 1e300 − 1e300 into inf − inf).
    tuned = {"w": torch.tensor([[1 + 1e-12, 1e300, 2.0]], dtype=torch.float64)}
    base = {"w": torch.tensor([[1.0, 1e300, 0.0]], dtype=torch.float64)}
    d = sparse_diff(tuned, base, density=1.0)["w"]
    assert d.dtype == torch.float32 and d.flat_indices.tolist() == [0, 1, 2]
    exact = torch.tensor((1 + 1e-12) - 1.0, dtype=torch.float64)  # exact (Sterbenz)
    assert d.values.tolist() == [exact.float().item(), 0.0, 2.0]
    # Finite fp32 weights whose difference is past fp32's range: named as an overflow.
    tuned, base = {"w": torch.tensor([[0.0, 3e38]])}, {"w": torch.tensor([[0.0, -3e38]])}
    with pytest.raises(ValueError, match=r"'w': finetuned − base.*does not fit torch\.float32"
                                         r".*flat index 1"):
        sparse_diff(tuned, base, density=0.5)


# ---------------------------------------------------------------------------------------------
# add_sparse
# ---------------------------------------------------------------------------------------------
def test_add_sparse_is_the_weighted_sum_over_the_union():
    a = SparseDelta.from_flat(torch.tensor([7, 0, 3], dtype=torch.int32), (3, 4),
                              torch.tensor([1.0, 2.0, 3.0]))
    b = SparseDelta.from_flat(torch.tensor([3, 11], dtype=torch.int32), (3, 4),
                              torch.tensor([-6.0, 5.0]).to(torch.bfloat16))
    s = add_sparse(a, b, wa=2.0, wb=0.5)
    assert s.flat_indices.tolist() == [0, 3, 7, 11] and s.flat_indices.dtype == torch.int32
    assert s.dtype == torch.float32  # promoted from float32 and bfloat16
    assert torch.equal(s.to_dense(), 2.0 * a.to_dense() + 0.5 * b.to_dense().float())
    assert s.values.tolist() == [4.0, 3.0, 2.0, 2.5]
    assert add_sparse(a, a, 1.0, -1.0).values.abs().sum() == 0  # cancelled entries stay, as 0
    with pytest.raises(ValueError, match=r"a has shape \(3, 4\) but b has shape \(4, 3\)"):
        add_sparse(a, SparseDelta.from_flat(torch.tensor([0]), (4, 3), torch.ones(1)))
    with pytest.raises(TypeError, match="b must be a SparseDelta"):
        add_sparse(a, a.to_dense())
    with pytest.raises(ValueError, match="wb must be a finite number"):
        add_sparse(a, b, wb=float("inf"))


# ---------------------------------------------------------------------------------------------
# lora_to_sparse
# ---------------------------------------------------------------------------------------------
def lora(out_f, in_f, rank, seed=0, dtype=torch.float32):
    a = torch.randn(rank, in_f, generator=gen(seed)).to(dtype)
    b = torch.randn(out_f, rank, generator=gen(seed + 1)).to(dtype)
    return a, b


def dense_lora(a, b, scale):
    """ΔW = scale·B·A, each entry summed in fp64 and rounded once to fp32."""
    return (scale * (b.double() @ a.double())).float()


def dense_error(delta, s):
    delta = delta.double()
    return (torch.linalg.norm(delta - s.to_dense().double()) / torch.linalg.norm(delta)).item()


@pytest.mark.parametrize("block_rows", [1, 3, 7, 29, 256])
@pytest.mark.parametrize("budget_kwargs", [{"r": 2}, {"density": 0.3}, {}], ids=str)
def test_lora_to_sparse_equals_the_dense_projection(block_rows, budget_kwargs):
    a, b = lora(29, 23, 4)
    s, err = lora_to_sparse(a, b, 0.75, block_rows=block_rows, **budget_kwargs)
    delta = dense_lora(a, b, 0.75)
    idx, vals = dense_top(delta, **(budget_kwargs or {"r": 4}))  # default: r = the LoRA's rank
    assert s.shape == (29, 23) and s.dtype == torch.float32
    assert torch.equal(s.flat_indices, idx) and torch.equal(s.values, vals)
    assert err == pytest.approx(dense_error(delta, s), rel=1e-5)
    assert 0 < err < 1
    # The fp32 matmul gives the same entries to within its rounding (rank 4, the scale).
    idx = s.flat_indices.long()
    assert_within_error_bound(s.values, (0.75 * (b.double() @ a.double())).view(-1)[idx],
                              (0.75 * (abs64(b) @ abs64(a))).view(-1)[idx], 4 + 1, "values",
                              torch_result=(0.75 * (b @ a)).view(-1)[idx])


@pytest.mark.parametrize("block_rows", [1, 2, 5, 40])
def test_lora_to_sparse_ties_go_to_the_lower_index_across_blocks(block_rows):
    # Small integer factors: ΔW has many equal magnitudes, spread over all row blocks.
    a = torch.randint(-2, 3, (2, 9), generator=gen(1)).float()
    b = torch.randint(-2, 3, (40, 2), generator=gen(2)).float()
    s, err = lora_to_sparse(a, b, 1.0, r=2, block_rows=block_rows)
    idx, vals = dense_top(b @ a, r=2)
    assert torch.equal(s.flat_indices, idx) and torch.equal(s.values, vals)
    assert err == pytest.approx(dense_error(b @ a, s), rel=1e-6)


def test_lora_to_sparse_edge_cases():
    a, b = lora(6, 5, 2, dtype=torch.bfloat16)
    s, err = lora_to_sparse(a, b, 2.0, density=1.0, block_rows=4)
    assert torch.equal(s.to_dense(), dense_lora(a, b, 2.0)) and err == 0.0
    s, err = lora_to_sparse(a, torch.zeros_like(b), 1.0, density=0.5)
    assert s.nnz == 15 and s.values.abs().sum() == 0 and err == 0.0  # ΔW = 0
    s, err = lora_to_sparse(a, b, torch.tensor(3.0), r=1, block_rows=2)  # a 1-element tensor scale
    ref, _ = lora_to_sparse(a, b, 3.0, r=1)
    assert torch.equal(s.flat_indices, ref.flat_indices)


def test_lora_to_sparse_error_does_not_depend_on_the_scale():
    # A power-of-two scale multiplies every fp32 entry of ΔW exactly (no subnormals here),
    # so S scales exactly and the relative error is the same number: squares that underflow
    # (~1e-24 entries) or overflow (~1e19) in fp32 must not change it, and an update whose
    # largest entry is just below fp32's maximum must not be refused.
    a, b = lora(64, 64, 4)
    ref, ref_err = lora_to_sparse(a, b, 1.0, r=1)
    assert 0 < ref_err < 1
    largest = dense_lora(a, b, 1.0).abs().max().item()
    edge = math.floor(math.log2(torch.finfo(torch.float32).max / largest))
    for exponent in (-80, 60, edge):
        s, err = lora_to_sparse(a, b, 2.0 ** exponent, r=1)
        assert torch.equal(s.flat_indices, ref.flat_indices), exponent
        assert torch.equal(s.values, ref.values * 2.0 ** exponent), exponent
        assert err == ref_err, exponent


def test_lora_to_sparse_bad_arguments():
    a, b = lora(6, 5, 2)
    with pytest.raises(ValueError, match=r"lora_B must be \[out, 2\]"):
        lora_to_sparse(a, b[:, :1], 1.0)
    with pytest.raises(ValueError, match="lora_A must be a 2-D floating-point tensor"):
        lora_to_sparse(a[0], b, 1.0)
    with pytest.raises(ValueError, match="lora_B must be a 2-D floating-point tensor"):
        lora_to_sparse(a, b.long(), 1.0)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        lora_to_sparse(a, b, float("nan"))
    with pytest.raises(ValueError, match="scale must be a number"):
        lora_to_sparse(a, b, torch.ones(2))
    with pytest.raises(ValueError, match="block_rows must be a positive int"):
        lora_to_sparse(a, b, 1.0, block_rows=0)
    with pytest.raises(ValueError, match="exactly one of r= or density="):
        lora_to_sparse(a, b, 1.0, r=1, density=0.5)
    with pytest.raises(ValueError, match="budget does not fit"):
        lora_to_sparse(a, b, 1.0, r=4)
    with pytest.raises(ValueError, match="lora_B has NaN or infinite entries"):
        lora_to_sparse(a, b * float("nan"), 1.0)
    with pytest.raises(ValueError, match="overflows float32"):
        lora_to_sparse(a * 1e30, b * 1e30, 1.0)


def test_lora_to_sparse_of_a_rank_0_lora_says_so():
    a, b = torch.zeros(0, 4), torch.zeros(3, 0)
    with pytest.raises(ValueError, match=r"the LoRA has rank 0 .*pass r= or density="):
        lora_to_sparse(a, b)
    s, err = lora_to_sparse(a, b, r=1)  # a budget given: ΔW = 0, so its entries are zeros
    assert s.nnz == 7 and s.values.abs().sum() == 0 and err == 0.0


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns while active.

    Every tensor made by torch code (matmul, abs, cat, indexing, ...) is the output of some op
    that reaches the dispatcher, so this bounds what the code under test materialises; scratch
    memory inside a single kernel (e.g. kthvalue's working copy) is not seen.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_lora_to_sparse_of_a_large_layer_stays_within_one_block():
    out_f, in_f, rank, block_rows = 4096, 11008, 16, 256
    a, b = lora(out_f, in_f, rank, seed=3)
    a.mul_(1 / math.sqrt(in_f))
    # The tracker works: it sees the dense update when that is built.
    with LargestTensor() as probe:
        (b[:8] @ a).abs()
    assert probe.largest == 8 * in_f
    k = budget((out_f, in_f), r=rank)
    start = time.perf_counter()
    with LargestTensor() as tracker:
        s, err = lora_to_sparse(a, b, 2.0, block_rows=block_rows)
    elapsed = time.perf_counter() - start
    assert s.nnz == k == rank * (out_f + in_f)
    assert tracker.largest <= block_rows * in_f + 2 * k, tracker.largest
    assert tracker.largest < out_f * in_f // 10  # far below the dense update
    assert 0 < err < 1
    # Spot-check the kept values against ΔW recomputed at their entries.
    rows, cols = s.flat_indices.long() // in_f, s.flat_indices.long() % in_f
    expected = 2.0 * (b[rows].double() * a[:, cols].T.double()).sum(1)
    magnitude = 2.0 * (abs64(b[rows]) * abs64(a[:, cols].T)).sum(1)
    assert_within_error_bound(s.values, expected, magnitude, rank + 1, "values")
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_exported_at_the_top_level():
    assert shira_kernels.sparse_diff is sparse_diff
    assert shira_kernels.lora_to_sparse is lora_to_sparse


def test_add_sparse_sums_in_float64_and_rounds_once():
    big = SparseDelta.from_flat(torch.tensor([0]), (2, 2), torch.tensor([3e38]))
    # 10·3e38 − 10·3e38 is 0; fp32 products overflowed to inf − inf = NaN.
    assert add_sparse(big, big, wa=10.0, wb=-10.0).values.tolist() == [0.0]
    # 1 + (1 + 2⁻²⁸)·2⁻²⁴ rounds once to 1 + 2⁻²³ (above the tie); rounding the product to
    # fp32 first gave the tie 1 + 2⁻²⁴, rounded to even: 1.
    one = SparseDelta.from_flat(torch.tensor([1]), (2, 2), torch.tensor([1.0]))
    tiny = SparseDelta.from_flat(torch.tensor([1]), (2, 2), torch.tensor([2.0 ** -24]))
    assert add_sparse(one, tiny, wb=1 + 2.0 ** -28).values.item() == 1 + 2.0 ** -23
    # fp16 values whose weighted sum fits fp16 although a plain sum would not.
    h = SparseDelta.from_flat(torch.tensor([0, 3]), (2, 2),
                              torch.tensor([60000.0, 1.0], dtype=torch.float16))
    s = add_sparse(h, h, wa=0.75, wb=0.25)
    assert s.dtype == torch.float16 and s.values.tolist() == [60000.0, 1.0]


def test_add_sparse_refuses_a_sum_past_the_dtype_and_non_finite_values():
    a = SparseDelta.from_flat(torch.tensor([0, 3]), (2, 2),
                              torch.tensor([1.0, 60000.0], dtype=torch.float16))
    b = SparseDelta.from_flat(torch.tensor([3, 1]), (2, 2),
                              torch.tensor([60000.0, 2.0], dtype=torch.float16))
    with pytest.raises(ValueError, match=r"add_sparse.*does not fit torch\.float16: 1 of 3 "
                                         r"entries.*flat index 3"):
        add_sparse(a, b)
    big = SparseDelta.from_flat(torch.tensor([2]), (2, 2), torch.tensor([3e38]))
    with pytest.raises(ValueError, match=r"does not fit torch\.float32.*flat index 2"):
        add_sparse(big, big, wa=1e300, wb=-1e300)  # the fp64 products themselves overflow
    for bad in (float("inf"), float("nan")):
        c = SparseDelta.from_flat(torch.tensor([0, 2]), (2, 2), torch.tensor([1.0, bad]))
        with pytest.raises(ValueError, match=r"b has 1 NaN or infinite values.*flat index 2"):
            add_sparse(a, c)
