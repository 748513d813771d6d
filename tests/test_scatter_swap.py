"""Batched scatter-swap: every backend against the reference, exact restore, bad input."""
import pytest
import torch
from torch.library import opcheck

import shira_kernels
from shira_kernels.ops.scatter_swap import scatter_swap_reference

from conftest import DTYPES


def make_case(sizes, dtype, seed=0, density=0.3, index_dtypes=(torch.int32, torch.int64),
              device="cpu"):
    """Weights of the given numels, random unique indices (mixed int32/int64, some unsorted)."""
    g = torch.Generator().manual_seed(seed)
    weights, indices, values = [], [], []
    for i, numel in enumerate(sizes):
        weights.append(torch.randn(numel, generator=g).to(dtype))
        count = int(numel * density) if numel > 1 else numel
        index = torch.randperm(numel, generator=g)[:count]
        if i % 3:  # sorted, as layers build them; the others stay in random order
            index = index.sort().values
        indices.append(index.to(index_dtypes[i % len(index_dtypes)]))
        values.append(torch.randn(count, generator=g).to(dtype))
    return ([w.to(device) for w in weights], [i.to(device) for i in indices],
            [v.to(device) for v in values])


def clone_all(tensors):
    return [t.clone() for t in tensors]


def assert_bit_equal(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        # Compare bit patterns, so that NaN payloads and -0.0 count too.
        assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           e.view(torch.int16 if e.element_size() == 2 else torch.int32)), i


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", [[4097], [1], [3, 0, 5]], ids=["one", "single-entry", "with-empty"])
def test_matches_reference(backend, device, dtype, sizes):
    weights, indices, values = make_case(sizes, dtype, device=device)
    expected_w, expected_v = clone_all(weights), clone_all(values)
    scatter_swap_reference(expected_w, indices, expected_v)
    shira_kernels.scatter_swap_(weights, indices, values)
    assert_bit_equal(weights, expected_w)
    assert_bit_equal(values, expected_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_200_tensors_of_mixed_sizes(backend, device, dtype):
    g = torch.Generator().manual_seed(1)
    # Sizes from 1 to ~50k entries: blocks of very different counts per tensor.
    sizes = [int(s) for s in torch.randint(1, 2000, (200,), generator=g)]
    sizes[::37] = [50_000] * len(sizes[::37])
    weights = [torch.randn(n, generator=g).to(device, dtype).view(-1, 1) if i % 2 else
               torch.randn(n, generator=g).to(device, dtype) for i, n in enumerate(sizes)]
    _, indices, values = make_case(sizes, dtype, seed=2, device=device)
    expected_w, expected_v = clone_all(weights), clone_all(values)
    scatter_swap_reference(expected_w, indices, expected_v)
    shira_kernels.scatter_swap_(weights, indices, values)
    assert_bit_equal(weights, expected_w)
    assert_bit_equal(values, expected_v)


def test_mixed_dtypes_in_one_call(backend, device):
    weights, indices, values = [], [], []
    for seed, dtype in enumerate(DTYPES):
        w, i, v = make_case([3000], dtype, seed=seed, device=device)
        weights += w
        indices += i
        values += v
    expected_w, expected_v = clone_all(weights), clone_all(values)
    scatter_swap_reference(expected_w, indices, expected_v)
    shira_kernels.scatter_swap_(weights, indices, values)
    assert_bit_equal(weights, expected_w)
    assert_bit_equal(values, expected_v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_1000_swaps_restore_bit_for_bit(backend, device, dtype):
    weights, indices, values = make_case([700, 5, 1000], dtype, seed=3, device=device)
    # Special bit patterns must survive as they are: NaN, infinities, -0.0, subnormals.
    weights[0][:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40]).to(device, dtype)
    indices[0] = torch.cat([torch.arange(4, device=device), indices[0][indices[0] >= 4]]).to(indices[0].dtype)
    values[0] = torch.randn(indices[0].numel()).to(device, dtype)
    base_w, base_v = clone_all(weights), clone_all(values)
    for step in range(1000):
        shira_kernels.scatter_swap_(weights, indices, values)
        if step == 0:
            assert not torch.equal(weights[2], base_w[2])
    assert_bit_equal(weights, base_w)
    assert_bit_equal(values, base_v)


def test_empty_lists_and_empty_indices(backend, device):
    shira_kernels.scatter_swap_([], [], [])
    w = torch.randn(4, 4, device=device)
    before = w.clone()
    shira_kernels.scatter_swap_([w], [torch.empty(0, dtype=torch.int64, device=device)],
                                [torch.empty(0, device=device)])
    assert torch.equal(w, before)


def test_parameters_that_require_grad_are_swapped(backend, device):
    layer = torch.nn.Linear(8, 4, device=device)
    base = layer.weight.detach().clone()
    index = torch.tensor([0, 9, 31], dtype=torch.int32, device=device)
    value = torch.tensor([1.0, 2.0, 3.0], device=device)
    shira_kernels.scatter_swap_([layer.weight], [index], [value])
    assert layer.weight.view(-1)[index.long()].tolist() == [1.0, 2.0, 3.0]
    assert layer.weight.requires_grad and layer.weight.grad_fn is None
    shira_kernels.scatter_swap_([layer.weight], [index], [value])
    assert torch.equal(layer.weight.detach(), base)


def test_opcheck(backend, device):
    weights, indices, values = make_case([100, 37], torch.float32, device=device)
    opcheck(torch.ops.shira.scatter_swap_.default, (weights, indices, values))


def test_traced_by_torch_compile():
    weights, indices, values = make_case([64, 9], torch.float32)
    expected_w, expected_v = clone_all(weights), clone_all(values)
    scatter_swap_reference(expected_w, indices, expected_v)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def swap(ws, idx, vs):
        torch.ops.shira.scatter_swap_(ws, idx, vs)

    swap(weights, indices, values)
    assert_bit_equal(weights, expected_w)
    assert_bit_equal(values, expected_v)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument and position, and no tensor changed.
# ---------------------------------------------------------------------------------------------
def _good(device):
    return make_case([50, 60, 70], torch.float32, seed=5, device=device)


def _case_unequal_lengths(device):
    w, i, v = _good(device)
    return w, i[:2], v, ValueError, "same length"


def _case_dtype_mismatch(device):
    w, i, v = _good(device)
    v[1] = v[1].half()
    return w, i, v, TypeError, r"values\[1\] has dtype torch.float16"


def _case_int_weight(device):
    w, i, v = _good(device)
    w[2] = torch.zeros(70, dtype=torch.int32, device=device)
    v[2] = v[2].to(torch.int32)
    return w, i, v, TypeError, r"weights\[2\] has dtype torch.int32"


def _case_float_indices(device):
    w, i, v = _good(device)
    i[0] = i[0].float()
    return w, i, v, TypeError, r"indices\[0\] must be int32 or int64"


def _case_device_mismatch(device):
    w, i, v = _good(device)
    w[1] = w[1].to("meta")
    return w, i, v, ValueError, r"weights\[1\] is on meta"


def _case_non_contiguous_weight(device):
    w, i, v = _good(device)
    w[1] = torch.randn(6, 20, device=device)[:, ::2]
    return w, i, v, ValueError, r"weights\[1\] must be contiguous"


def _case_length_mismatch(device):
    w, i, v = _good(device)
    v[2] = v[2][:-1].clone()
    return w, i, v, ValueError, r"values\[2\] has 20 entries but indices\[2\] has 21"


def _case_out_of_range(device):
    w, i, v = _good(device)
    i[1] = i[1].clone()
    i[1][-1] = 60
    return w, i, v, ValueError, r"indices\[1\] has entries out of range"


def _case_negative_index(device):
    w, i, v = _good(device)
    i[2] = i[2].clone()
    i[2][0] = -1
    return w, i, v, ValueError, r"indices\[2\] has entries out of range"


def _case_repeated_index(device):
    w, i, v = _good(device)
    i[0] = i[0].clone()
    i[0][1] = i[0][0]
    return w, i, v, ValueError, r"indices\[0\] has repeated entries"


def _case_aliased_weights(device):
    w, i, v = _good(device)
    w[2] = w[0]
    i[2], v[2] = i[0], v[0].clone()
    return w, i, v, ValueError, r"weights\[0\] and weights\[2\] overlap"


def _case_value_is_weight_view(device):
    w, i, v = _good(device)
    v[0] = w[1][: v[0].numel()]
    return w, i, v, ValueError, r"overlap in memory"


def _case_not_a_list(device):
    w, i, v = _good(device)
    return w[0], i, v, TypeError, "weights must be a list or tuple of tensors"


def _case_not_a_tensor(device):
    w, i, v = _good(device)
    v[1] = [1.0, 2.0]
    return w, i, v, TypeError, r"values\[1\] must be a torch.Tensor"


BAD_CASES = [_case_unequal_lengths, _case_dtype_mismatch, _case_int_weight, _case_float_indices,
             _case_device_mismatch, _case_non_contiguous_weight, _case_length_mismatch,
             _case_out_of_range, _case_negative_index, _case_repeated_index, _case_aliased_weights,
             _case_value_is_weight_view, _case_not_a_list, _case_not_a_tensor]


@pytest.mark.parametrize("make_bad", BAD_CASES, ids=lambda f: f.__name__[6:])
def test_bad_input_raises_and_changes_nothing(backend, device, make_bad):
    weights, indices, values, error, message = make_bad(device)
    tensors = [t for seq in (weights, indices, values) if isinstance(seq, list) for t in seq
               if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    before = [t.clone() for t in tensors]
    with pytest.raises(error, match=message):
        shira_kernels.scatter_swap_(weights, indices, values)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


def test_index_written_after_a_good_call_is_checked_again(backend, device):
    weights, indices, values = _good(device)
    shira_kernels.scatter_swap_(weights, indices, values)
    shira_kernels.scatter_swap_(weights, indices, values)
    indices[1][0] = 10_000  # an in-place write bumps the version: the cached check is redone
    with pytest.raises(ValueError, match=r"indices\[1\] has entries out of range"):
        shira_kernels.scatter_swap_(weights, indices, values)


def test_validate_indices():
    shira_kernels.validate_indices(torch.tensor([3, 1, 2]), 4)
    shira_kernels.validate_indices(torch.empty(0, dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="out of range: min 0, max 4"):
        shira_kernels.validate_indices(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="repeated"):
        shira_kernels.validate_indices(torch.tensor([2, 0, 2]), 4)
    with pytest.raises(ValueError, match="1-D"):
        shira_kernels.validate_indices(torch.zeros(2, 2, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="int32 or int64"):
        shira_kernels.validate_indices(torch.zeros(2), 4)
