"""multi_binary_lora: a batch whose rows use different 1-bit LoRA adapters, every backend. Each
group of rows is exactly binary_lora with its adapter on those rows (itself tested against float64
in test_binary.py), forward and gradient; the float64 reference checks the whole."""
import pytest
import torch
from torch.library import opcheck

import shira_kernels
from shira_kernels.formats import BinaryWeight
from shira_kernels.ops.binary import binary_lora
from shira_kernels.ops import multi_binary
from shira_kernels.ops.multi_binary import multi_binary_lora_reference

from conftest import DTYPES
from test_binary import binary_k, lora_exact_and_magnitude
from tolerance import abs64, assert_within_error_bound


def make_adapters(in_f, out_f, ranks, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for i, r in enumerate(ranks):
        down = BinaryWeight.from_float(torch.randn(r, in_f, generator=g), "petl").to(device)
        up = BinaryWeight.from_float(torch.randn(out_f, r, generator=g) * 0.1, "row").to(device)
        adapters.append((down, up, (0.5, 2.0, 1.0)[i % 3]))
    return adapters


CASES = {  # (tokens, in, out, ranks), the rows' adapters
    "mixed": ((9, 65, 33, (4, 7, 3)), [0, 1, -1, 0, 2, 1, 0, -1, 2]),
    "one-row-group": ((5, 40, 17, (5, 2)), [0, 0, 1, -1, 0]),
    "absent-adapter": ((6, 130, 8, (3, 3, 9)), [2, 0, 2, 0, -1, 2]),
    "all-base": ((4, 10, 6, (2,)), [-1, -1, -1, -1]),
    "one-adapter": ((7, 50, 131, (6, 4)), [1] * 7),
}


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_each_group_is_binary_lora_on_its_rows(backend, device, dtype, case, activation):
    (tokens, in_f, out_f, ranks), assignment = CASES[case]
    adapters = make_adapters(in_f, out_f, ranks, device)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    x.requires_grad_()
    row_adapter = torch.tensor(assignment, device=device)
    y = shira_kernels.multi_binary_lora(x, adapters, row_adapter, activation)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    gx, = torch.autograd.grad(y, x, gy)
    assert y.dtype == dtype and y.shape == (tokens, out_f)
    for a in set(assignment):
        rows = (row_adapter == a).nonzero().view(-1)
        if a == -1:
            assert torch.equal(y[rows], torch.zeros_like(y[rows]))
            assert torch.equal(gx[rows], torch.zeros_like(gx[rows]))
            continue
        xa = x.detach()[rows].requires_grad_()
        down, up, scale = adapters[a]
        ya = binary_lora(xa, down, up, scale, activation)
        assert torch.equal(y[rows], ya), a
        assert torch.equal(gx[rows], torch.autograd.grad(ya, xa, gy[rows])[0]), a


@pytest.mark.parametrize("strategy", ["lut", "dequantize"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_groups_run_the_strategy_binary_lora_would(backend, device, dtype, strategy,
                                                   monkeypatch):
    # Each group takes the strategy binary_lora's "auto" takes for that many rows (measured per
    # machine; here fixed), so each row is still the same bits as binary_lora on its rows.
    asked = []

    def fixed(*args):
        asked.append(args)
        return strategy
    monkeypatch.setattr(multi_binary, "lora_auto_strategy", fixed)
    monkeypatch.setattr(shira_kernels.ops.binary, "lora_auto_strategy", fixed)
    (tokens, in_f, out_f, ranks), assignment = CASES["mixed"]
    adapters = make_adapters(in_f, out_f, ranks, device)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    row_adapter = torch.tensor(assignment, device=device)
    y = shira_kernels.multi_binary_lora(x, adapters, row_adapter, "relu")
    # (rows, rank, in, out) per group: adapter 0 has 3 rows, 1 and 2 have 2 each
    assert sorted(a[2:] for a in asked) == [(2, 3, 65, 33), (2, 7, 65, 33), (3, 4, 65, 33)]
    for a in (0, 1, 2):
        rows = (row_adapter == a).nonzero().view(-1)
        down, up, scale = adapters[a]
        assert torch.equal(y[rows], binary_lora(x[rows], down, up, scale, "relu")), a


@pytest.mark.parametrize("activation", [None, "relu"])
def test_against_float64_with_the_gradient(activation):
    (tokens, in_f, out_f, ranks), assignment = CASES["mixed"]
    adapters = make_adapters(in_f, out_f, ranks)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1)).requires_grad_()
    row_adapter = torch.tensor(assignment)
    y = shira_kernels.multi_binary_lora(x, adapters, row_adapter, activation)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    gx, = torch.autograd.grad(y, x, gy)
    # The reference (binary_lora's, group by group) is the specification: within the same bound.
    as_tuples = [((d.packed, d.alpha, d.mu, d.shape[1]), (u.packed, u.alpha, u.mu, u.shape[1]), s)
                 for d, u, s in adapters]
    reference = multi_binary_lora_reference(x.detach(), as_tuples, row_adapter,
                                            activation == "relu")
    base_rows = row_adapter == -1
    assert torch.equal(y[base_rows], reference[base_rows]) and not y[base_rows].any()
    for a, (down, up, scale) in enumerate(adapters):
        rows = (row_adapter == a).nonzero().view(-1)
        x64 = x.detach()[rows].double().requires_grad_()
        exact, magnitude, x_abs = lora_exact_and_magnitude(x64, down, up, scale,
                                                           activation == "relu")
        k = binary_k(in_f) + binary_k(down.shape[0]) + 1  # as test_binary's binary_lora
        assert_within_error_bound(y[rows], exact, magnitude, k, f"y of adapter {a}")
        assert_within_error_bound(reference[rows], exact, magnitude, k, f"reference {a}")
        gx_exact, = torch.autograd.grad(exact, x64, gy[rows].double())
        gx_magnitude, = torch.autograd.grad(magnitude, x_abs, abs64(gy[rows]))
        assert_within_error_bound(gx[rows], gx_exact, gx_magnitude, k, f"grad x of adapter {a}")


def test_names_broadcast_opcheck_and_compile():
    adapters = make_adapters(20, 12, (3, 5))
    named = {"a": adapters[0], "b": adapters[1]}
    x = torch.randn(2, 3, 20, generator=torch.Generator().manual_seed(4))
    by_name = shira_kernels.multi_binary_lora(x, named, ["b", "__base__"])
    by_slot = shira_kernels.multi_binary_lora(x, adapters, torch.tensor([[1, 1, 1], [-1] * 3]))
    assert torch.equal(by_name, by_slot) and not torch.equal(by_name[0], torch.zeros(3, 12))
    assert torch.equal(by_name[1], torch.zeros(3, 12))
    # A free slot (None) is skipped; a row using it is refused when the op runs.
    with_free = [None, adapters[1]]
    assert torch.equal(shira_kernels.multi_binary_lora(x, with_free, [1, -1]), by_slot)
    with pytest.raises(ValueError, match="row_adapter holds 0"):
        shira_kernels.multi_binary_lora(x, with_free, [0, 1])
    x2 = x.reshape(6, 20).requires_grad_()
    row_adapter = torch.tensor([0, 1, -1, 1, 0, 0])
    d, u = adapters[0][0], adapters[0][1]
    d1, u1 = adapters[1][0], adapters[1][1]
    opcheck(multi_binary._multi_binary_lora_op,
            (x2, row_adapter, [d.packed, d1.packed], [d.alpha, d1.alpha], [d.mu, d1.mu],
             [u.packed, u1.packed], [u.alpha, u1.alpha], [u.mu, u1.mu], [3, 5], 20, 12,
             [adapters[0][2], adapters[1][2]], True))

    def step(x, row_adapter):
        return shira_kernels.multi_binary_lora(x, adapters, row_adapter, "relu")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in ([0, 1, -1, 1, 0, 0], [1, 1, 1, 1, 1, 1]):
            ra = torch.tensor(rows)
            y, expected = compiled(x2, ra), step(x2, ra)
            assert torch.equal(y, expected)
            assert torch.equal(torch.autograd.grad(y.sum(), x2)[0],
                               torch.autograd.grad(expected.sum(), x2)[0])
    torch._dynamo.reset()


def test_bad_inputs_name_the_argument():
    adapters = make_adapters(20, 12, (3, 5))
    x = torch.randn(4, 20)
    with pytest.raises(ValueError, match="activation must be one of"):
        shira_kernels.multi_binary_lora(x, adapters, [0] * 4, "gelu")
    with pytest.raises(TypeError, match="adapters must be a sequence"):
        shira_kernels.multi_binary_lora(x, 3, [0] * 4)
    with pytest.raises(TypeError, match=r"adapters\[1\] must be \(down, up, scale\)"):
        shira_kernels.multi_binary_lora(x, [adapters[0], (1, 2)], [0] * 4)
    with pytest.raises(TypeError, match=r"adapters\[0\]'s down must be a BinaryWeight"):
        shira_kernels.multi_binary_lora(x, [(torch.ones(3, 20), adapters[0][1], 1.0)], [0] * 4)
    other = make_adapters(20, 13, (3,))[0]
    with pytest.raises(ValueError, match=r"adapters\[1\] maps 20 → 13"):
        shira_kernels.multi_binary_lora(x, [adapters[0], other], [0] * 4)
    with pytest.raises(ValueError, match="no adapter"):
        shira_kernels.multi_binary_lora(x, [None], [-1] * 4)
    with pytest.raises(ValueError, match="last dim must be"):
        shira_kernels.multi_binary_lora(torch.randn(4, 21), adapters, [0] * 4)
    with pytest.raises(ValueError, match="row_adapter has shape"):
        shira_kernels.multi_binary_lora(x, adapters, [0] * 3)
    with pytest.raises(TypeError, match="row_adapter holds names"):
        shira_kernels.multi_binary_lora(x, adapters, ["a"] * 4)
    with pytest.raises(KeyError, match="no adapter 'zz'"):
        shira_kernels.multi_binary_lora(x, {"a": adapters[0]}, ["zz", None, None, None])
    with pytest.raises(ValueError, match="row_adapter holds 2"):
        shira_kernels.multi_binary_lora(x, adapters, [2, 0, 0, 0])
    with pytest.raises(ValueError, match="row_adapter names 'q', whose entry in adapters is None"):
        shira_kernels.multi_binary_lora(x, {"p": adapters[0], "q": None}, ["p", "q", "p", "q"])
    with pytest.raises(TypeError, match="row_adapter must be a list of adapter names"):
        shira_kernels.multi_binary_lora(x, {"p": adapters[0]}, [b"p"] * 4)
    # Rows all base: None names whatever form adapters takes, as multi_delta_linear takes them.
    for base in ([None] * 4, ["__base__"] * 4):
        assert not shira_kernels.multi_binary_lora(x, adapters, base).any()
