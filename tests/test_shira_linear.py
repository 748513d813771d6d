"""ShiraLinear and replace_linear: drop-in behaviour, gradients against the reference
formulation, exact merge/unmerge, training, state_dict, torch.compile."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shira_kernels import sparse_delta_linear
from shira_kernels.nn import ShiraLinear, mark_only_adapters_trainable, replace_linear

from conftest import DTYPES
from test_sparse_delta import delta_linear_bound
from tolerance import abs64, assert_within_error_bound


def trained_layer(in_f=33, out_f=17, dtype=torch.float32, r=2, seed=0, device="cpu"):
    torch.manual_seed(seed)
    layer = ShiraLinear.from_linear(nn.Linear(in_f, out_f).to(dtype), r=r, seed=seed)
    with torch.no_grad():
        layer.shira_values.copy_(torch.randn(layer.shira_values.shape))
    return layer.to(device)


def test_from_linear_is_a_drop_in_replacement():
    base = nn.Linear(10, 6)
    keys = set(base.state_dict())
    layer = ShiraLinear.from_linear(base, r=1)
    assert isinstance(layer, nn.Linear)
    assert layer.weight is base.weight and layer.bias is base.bias  # no copy
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert keys <= set(layer.state_dict()) and {"shira_values", "shira_flat_indices"} <= set(layer.state_dict())
    assert layer.shira_values.numel() == 1 * (10 + 6) and layer.shira_values.requires_grad
    x = torch.randn(4, 10)
    # The adapter starts at zero: with torch's matmul (spmm) the output is the base layer's,
    # bit for bit; "fold" (auto for fp32 on the CPU) runs its own matmul, whose sums
    # round in another order.
    layer.strategy = "spmm"
    assert torch.equal(layer(x), base(x))
    layer.strategy = "auto"
    exact = x.double() @ base.weight.double().T + base.bias.double()
    magnitude = abs64(x) @ abs64(base.weight).T + abs64(base.bias)
    k, n = delta_linear_bound(10)
    assert_within_error_bound(layer(x), exact, magnitude, k, "auto", torch_result=base(x),
                              roundings=n)
    assert layer.delta.nnz == 16 and layer.delta.shape == (6, 10)


@pytest.mark.parametrize("strategy", ["fold", "spmm", "swap", "merge"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_equals_the_clone_and_add_formulation(backend, device, dtype, strategy):
    layer = trained_layer(dtype=dtype, device=device)
    layer.strategy = strategy
    x = torch.randn(2, 5, 33).to(device, dtype).requires_grad_(True)
    gy = torch.randn(2, 5, 17).to(device, dtype)
    y = layer(x)
    ours = [y, *torch.autograd.grad(y, [x, layer.shira_values], gy)]

    def reference(x, values, weight, bias, scale=layer.scale):
        w = weight.clone()
        w.view(-1)[layer.shira_flat_indices.long()] += scale * values
        return F.linear(x, w, bias)

    ref = reference(x, layer.shira_values, layer.weight, layer.bias)
    theirs = [ref, *torch.autograd.grad(ref, [x, layer.shira_values], gy)]
    x64 = x.detach().double().requires_grad_(True)
    v64 = layer.shira_values.detach().double().requires_grad_(True)
    ref64 = reference(x64, v64, layer.weight.double(), layer.bias.double())
    exact = [ref64, *torch.autograd.grad(ref64, [x64, v64], gy.double())]
    # The magnitudes: the same formula and gradients on the absolute values.
    x_abs, v_abs = (abs64(t).requires_grad_(True) for t in (x, layer.shira_values))
    ref_abs = reference(x_abs, v_abs, abs64(layer.weight), abs64(layer.bias), abs(layer.scale))
    magnitude = [ref_abs, *torch.autograd.grad(ref_abs, [x_abs, v_abs], abs64(gy))]
    # y, grad x: delta_linear_bound; the values' gradient: a sum over the 10 tokens, the scale.
    bounds = [delta_linear_bound(33), delta_linear_bound(17), (10 + 1, 0)]
    for name, o, t, e, m, (k, n) in zip(["y", "grad x", "grad values"], ours, theirs, exact,
                                        magnitude, bounds):
        assert_within_error_bound(o, e, m, k, name, torch_result=t, roundings=n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_and_unmerge_are_exact(backend, device, dtype):
    layer = trained_layer(dtype=dtype, device=device)
    base = layer.weight.detach().clone()
    x = torch.randn(3, 33).to(device, dtype)
    unfused = layer(x)
    layer.merge()
    assert layer.merged
    changed = (layer.weight != base).view(-1).nonzero().view(-1)
    assert set(changed.tolist()) <= set(layer.shira_flat_indices.tolist())
    # Merged or not, the forward is x·(W + scale·S)ᵀ + b within the bound of every strategy
    # (merged: W + scale·S rounded once to the dtype, then torch's matmul).
    delta = layer.delta
    exact = F.linear(x.double(), base.double() + layer.scale * delta.to_dense(torch.float64),
                     layer.bias.double())
    magnitude = F.linear(abs64(x), abs64(base) + abs(layer.scale) * abs64(delta.to_dense()),
                         abs64(layer.bias))
    k, n = delta_linear_bound(33)
    assert_within_error_bound(unfused, exact, magnitude, k, "unfused forward", roundings=n)
    assert_within_error_bound(layer(x), exact, magnitude, k, "merged forward", roundings=n)
    layer.merge()  # merging twice is a no-op
    layer.unmerge()
    assert torch.equal(layer.weight, base)
    layer.unmerge()
    assert torch.equal(layer.weight, base)


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_training_lowers_the_loss_and_changes_only_masked_entries(backend, device):
    torch.manual_seed(0)
    model = TinyModel().to(device)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = replace_linear(model, ["up", "down"], r=2)
    assert names == ["up", "down"]
    assert mark_only_adapters_trainable(model) == 2 * (16 + 64) + 2 * (64 + 4)
    x, target = torch.randn(64, 16).to(device), torch.randn(64, 4).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for name in ("up", "down"):
        layer = getattr(model, name)
        assert torch.equal(layer.weight, base[f"{name}.weight"])  # unfused: W never written
        layer.merge()
        changed = (layer.weight != base[f"{name}.weight"]).view(-1).nonzero().view(-1)
        assert len(changed) > 0 and set(changed.tolist()) <= set(layer.shira_flat_indices.tolist())
        layer.unmerge()
        assert torch.equal(layer.weight, base[f"{name}.weight"])


def test_state_dict_round_trip_with_another_mask():
    src = trained_layer(seed=1)
    dst = ShiraLinear.from_linear(nn.Linear(33, 17), r=2, seed=2)
    assert not torch.equal(src.shira_flat_indices, dst.shira_flat_indices)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 33)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    assert torch.equal(dst._shira_row_offsets, src._shira_row_offsets)  # structure re-derived


def test_state_dict_holds_the_indices_under_their_new_name_only():
    keys = set(trained_layer().state_dict())
    assert "shira_flat_indices" in keys and "shira_indices" not in keys


def test_state_dict_saved_under_the_old_indices_name_loads():
    # Checkpoints of earlier versions name the buffer shira_indices.
    src = nn.Sequential(trained_layer(seed=1))
    old = {k.replace("shira_flat_indices", "shira_indices"): v
           for k, v in src.state_dict().items()}
    assert "0.shira_indices" in old and "0.shira_flat_indices" not in old
    dst = nn.Sequential(ShiraLinear.from_linear(nn.Linear(33, 17), r=2, seed=2))
    dst.load_state_dict(old)  # strict: no unexpected or missing key
    assert "0.shira_indices" in old  # the caller's dict is left as it was
    for (k1, v1), (k2, v2) in zip(dst.state_dict().items(), src.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(4, 33)
    assert torch.equal(dst(x), src(x))
    assert torch.equal(dst[0]._shira_row_offsets, src[0]._shira_row_offsets)
    # The old key is checked as the new one is: a repeated entry is refused, nothing changes.
    bad = dict(old)
    bad["0.shira_indices"] = old["0.shira_indices"].clone()
    bad["0.shira_indices"][1] = bad["0.shira_indices"][0]
    other = nn.Sequential(ShiraLinear.from_linear(nn.Linear(33, 17), r=2, seed=3))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="shira_flat_indices"):
        other.load_state_dict(bad)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_shira_indices_is_a_deprecated_alias_of_shira_flat_indices():
    layer, other = trained_layer(seed=1), trained_layer(seed=2)
    with pytest.warns(DeprecationWarning, match="shira_flat_indices"):
        assert layer.shira_indices is layer.shira_flat_indices
    with torch.no_grad():
        layer.weight.copy_(other.weight)
        layer.bias.copy_(other.bias)
        layer.shira_values.copy_(other.shira_values)
    with pytest.warns(DeprecationWarning, match="shira_flat_indices"):
        layer.shira_indices = other.shira_flat_indices.clone()
    assert torch.equal(layer.shira_flat_indices, other.shira_flat_indices)
    assert "shira_flat_indices" in layer._buffers and "shira_indices" not in layer.state_dict()
    x = torch.randn(3, 33)
    assert torch.equal(layer(x), other(x))  # the structure is re-derived from the new indices


def test_to_moves_and_casts_the_adapter():
    layer = trained_layer().to(torch.bfloat16)
    assert layer.shira_values.dtype == torch.bfloat16 and layer.shira_flat_indices.dtype == torch.int32
    assert layer(torch.randn(2, 33, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_torch_compile_fullgraph_of_a_model_with_shira_layers():
    torch.manual_seed(0)
    model = TinyModel()
    replace_linear(model, filter=lambda name, m: True, r=2)
    x = torch.randn(8, 16)
    expected = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert model.up.shira_values.grad is not None


def _compile_counted(model):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(model, backend=counter, fullgraph=True), counter


def test_hotswap_in_a_compiled_model_recompiles_nothing():
    from shira_kernels import SparseDelta
    torch.manual_seed(0)
    model = TinyModel()
    replace_linear(model, filter=lambda name, m: True, r=2)
    compiled, counter = _compile_counted(model)
    x = torch.randn(8, 16)
    with torch.no_grad():
        compiled(x)
        layer = model.up
        capacity = layer.shira_values.numel()
        for nnz in (capacity, capacity // 2, 1):  # another mask of the same size, then smaller
            flat = torch.randperm(layer.weight.numel())[:nnz]
            delta = SparseDelta.from_flat(flat, layer.weight.shape, torch.randn(nnz))
            layer.hotswap_(delta)
            assert layer.shira_values.numel() == capacity
            dense = (layer.weight + delta.to_dense()).detach()
            expected = model.down(torch.relu(F.linear(x, dense, layer.bias)))
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1  # one graph, never recompiled
    with pytest.raises(ValueError, match="more than this layer's"):
        layer.hotswap_(SparseDelta.from_flat(torch.arange(capacity + 1), layer.weight.shape))


def test_hotswap_while_another_thread_runs_the_layer_corrupts_nothing():
    # The "swap" strategy swaps W's entries at the layer's indices out and back in during a
    # forward; hotswap_ waits for it (the weight's lock), so W comes back as it was.
    import threading
    from shira_kernels import SparseDelta
    torch.manual_seed(0)
    # Big enough that a forward's matmul (between its swap in and out) takes a while.
    layer = ShiraLinear.from_linear(nn.Linear(512, 384), r=4)
    layer.strategy = "swap"
    base = layer.weight.detach().clone()
    capacity = layer.shira_values.numel()
    deltas = [SparseDelta.from_flat(torch.randperm(512 * 384)[:capacity], (384, 512),
                                    torch.randn(capacity)) for _ in range(4)]
    x, stop, errors, forwards = torch.randn(512, 512), threading.Event(), [], [0]

    def run():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    layer(x)
                    forwards[0] += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    worker = threading.Thread(target=run)
    worker.start()
    # Swap masks for as long as the other thread runs 30 forwards (without the lock this left
    # wrong entries in W).
    i = 0
    while forwards[0] < 30 and worker.is_alive():
        layer.hotswap_(deltas[i % len(deltas)])
        i += 1
    stop.set()
    worker.join()
    assert not errors
    assert torch.equal(layer.weight.detach(), base)
    delta = deltas[(i - 1) % len(deltas)]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, base + delta.to_dense(), layer.bias),
                                   rtol=1e-5, atol=1e-5)


def test_hotswap_refuses_bad_input_and_changes_nothing():
    from shira_kernels import SparseDelta
    torch.manual_seed(0)
    layer = ShiraLinear.from_linear(nn.Linear(16, 8), r=1)
    before = {k: v.clone() for k, v in layer.state_dict(keep_vars=False).items()}
    structure = [b.clone() for n, b in layer.named_buffers() if n.startswith("_shira_")]
    with pytest.raises(TypeError, match="delta must be a SparseDelta"):
        layer.hotswap_({"indices": torch.arange(3)})
    with pytest.raises(ValueError, match="delta has shape"):
        layer.hotswap_(SparseDelta.from_flat(torch.arange(3), (8, 15)))
    with pytest.raises(ValueError, match="more than this layer's"):
        layer.hotswap_(SparseDelta.from_flat(torch.arange(25), (8, 16)))
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.hotswap_(SparseDelta.from_flat(torch.arange(3), (8, 16)))
    layer.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(
        structure, [b for n, b in layer.named_buffers() if n.startswith("_shira_")]))


@pytest.mark.parametrize("write", ["hotswap_", "load_state_dict"])
def test_the_layer_owns_a_copy_of_the_indices_it_was_given(write):
    """ShiraLinear(indices=t) used to register t itself as its buffer (and derive its
    structure buffers from t's cache entry): hotswap_ and load_state_dict, which write the
    buffers in place, overwrote the caller's tensor and any SparseDelta built on it."""
    from shira_kernels import SparseDelta
    idx = torch.tensor([0, 5, 9])
    layer = ShiraLinear(4, 4, indices=idx)
    original = SparseDelta((4, 4), idx, torch.tensor([1., 2., 3.]))
    dense = original.to_dense()
    x = torch.randn(2, 4)
    out = sparse_delta_linear(x, torch.zeros(4, 4), None, original)
    other = SparseDelta((4, 4), torch.tensor([2, 3, 4]), torch.tensor([7., 8., 9.]))
    if write == "hotswap_":
        layer.hotswap_(other)
    else:
        layer.load_state_dict({**layer.state_dict(), "shira_flat_indices": other.flat_indices})
    assert layer.shira_flat_indices.tolist() == [2, 3, 4]
    assert idx.tolist() == [0, 5, 9]
    assert torch.equal(original.to_dense(), dense)
    assert torch.equal(sparse_delta_linear(x, torch.zeros(4, 4), None, original), out)


def test_bank_switch_in_a_compiled_model_recompiles_nothing():
    from shira_kernels import AdapterBank, SparseDelta
    torch.manual_seed(0)
    model = TinyModel()
    bank = AdapterBank(model)
    for name in ("a", "b"):
        bank.add(name, {"up": SparseDelta.from_flat(torch.randperm(1024)[:40], (64, 16),
                                                    torch.randn(40))})
    compiled, counter = _compile_counted(model)
    x = torch.randn(8, 16)
    with torch.no_grad():
        for state in (None, "a", "b", None, "a"):
            bank.activate(state)
            torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1


def test_bank_hotswap_serves_adapters_unfused_in_a_compiled_model_without_recompiling():
    from shira_kernels import AdapterBank, SparseDelta
    torch.manual_seed(0)
    model = TinyModel()
    replace_linear(model, filter=lambda name, m: True, r=2, scale=0.5)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    bank = AdapterBank(model)
    up_cap, down_cap = model.up.shira_values.numel(), model.down.shira_values.numel()
    # a: both layers, full size, scale 1; b: "up" only, a smaller mask, scale 0.25 (the
    # layers' own scale is 0.5: the values are rescaled into it).
    sizes = {"a": {"up": up_cap, "down": down_cap}, "b": {"up": up_cap // 3}}
    scales = {"a": 1.0, "b": 0.25}
    given = {}
    for name, layers in sizes.items():
        given[name] = {}
        for layer, nnz in layers.items():
            w = getattr(model, layer).weight
            given[name][layer] = SparseDelta.from_flat(torch.randperm(w.numel())[:nnz], w.shape,
                                                       torch.randn(nnz))
        bank.add(name, given[name], scale=scales[name])

    def expected(x, name):
        out = x
        for layer in ("up", "down"):
            w = base[f"{layer}.weight"].clone()
            if name is not None and layer in given[name]:
                w = w + scales[name] * given[name][layer].to_dense()
            out = F.linear(out, w, base[f"{layer}.bias"])
            if layer == "up":
                out = torch.relu(out)
        return out

    compiled, counter = _compile_counted(model)
    x = torch.randn(8, 16)
    with torch.no_grad():
        for name in ("a", "b", None, "a"):
            bank.hotswap(name)
            assert bank.hotswapped == name
            torch.testing.assert_close(compiled(x), expected(x, name), rtol=1e-5, atol=1e-5)
            # W itself is never written: the adapters live in the layers' own tensors.
            assert all(torch.equal(p, base[n]) for n, p in model.named_parameters()
                       if not n.endswith("shira_values"))
    assert counter.frame_count == 1
    # All or nothing: an adapter too big for one layer changes no layer.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    big = SparseDelta.from_flat(torch.randperm(64 * 16)[:up_cap + 1], (64, 16),
                                torch.randn(up_cap + 1))
    bank.add("big", {"down": given["a"]["down"], "up": big})
    with pytest.raises(ValueError, match="more than its"):
        bank.hotswap("big")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert bank.hotswapped == "a"
    with pytest.raises(KeyError):
        bank.hotswap("nope")
    bank.activate("b")
    with pytest.raises(RuntimeError, match="deactivate"):
        bank.hotswap("a")
    bank.deactivate()
    model.down.scale = 0.0  # no values could carry the adapter: refused, nothing written
    with pytest.raises(ValueError, match="scale 0"):
        bank.hotswap("a")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    plain = TinyModel()
    plain_bank = AdapterBank(plain)
    plain_bank.add("a", {"up": given["b"]["up"]})
    with pytest.raises(TypeError, match="not a ShiraLinear"):
        plain_bank.hotswap("a")


def test_masks_are_passed_through():
    base = nn.Linear(8, 4)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[1, 2] = mask[3, 7] = True
    layer = ShiraLinear.from_linear(base, mask=mask)
    assert layer.shira_flat_indices.tolist() == [1 * 8 + 2, 3 * 8 + 7]
    wm = ShiraLinear.from_linear(nn.Linear(8, 4), mask="wm", density=0.25)
    assert wm.shira_values.numel() == 8


def test_a_float64_layer_is_refused_naming_the_supported_dtypes():
    # float64 is a float weight, just not one the kernels take: the message called it "neither
    # a float weight nor a supported quantized layer".
    base = nn.Linear(8, 6).double()
    with pytest.raises(TypeError, match="linear.weight has dtype torch.float64; supported: "
                                        "float32, float16, bfloat16, or a quantized layer"):
        ShiraLinear.from_linear(base, r=1)
    assert base.weight.requires_grad  # refused before the base layer is frozen


def test_bad_arguments():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        ShiraLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="already a ShiraLinear"):
        ShiraLinear.from_linear(trained_layer())
    with pytest.raises(ValueError):
        ShiraLinear.from_linear(nn.Linear(8, 4), mask=torch.zeros(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="budget does not fit"):
        ShiraLinear.from_linear(nn.Linear(8, 4), r=100)
    model = TinyModel()
    with pytest.raises(ValueError, match="exactly one of target_modules or filter"):
        replace_linear(model)
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        replace_linear(model, ["nothing"])
    assert isinstance(model.up, nn.Linear) and not isinstance(model.up, ShiraLinear)
