"""torch.func transforms over the package's layers and ops: grad, vmap(grad) (per-sample
gradients, as differentially private training takes them) and jacrev. They refused every op
before ("an autograd.Function ... must override the setup_context staticmethod", torch.library's
generated one included). The eager autograd.Functions now take them, running the same kernels on
the same inputs, so each result is the same bits as plain autograd's (per sample: autograd on
that sample alone, since under vmap the kernels run once per batch entry)."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from shira_kernels import BinaryWeight
from shira_kernels.nn import replace_linear
from shira_kernels.ops.binary import binary_linear, binary_lora

from conftest import DTYPES
from unchanged import bits

STRATEGIES = ("spmm", "fold", "swap", "merge")


def same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b)), f"{what}: max diff {(a.double() - b.double()).abs().max()}"


def shira_mlp(strategy, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(17, 24), nn.ReLU(), nn.Linear(24, 9))
    replace_linear(model, ["0", "2"], r=2, seed=0)
    for layer in (model[0], model[2]):
        layer.strategy = strategy
        with torch.no_grad():
            layer.shira_values.normal_(0, 0.1)
    return model.to(dtype)


def loss_of(model):
    def loss(params, x):
        return functional_call(model, params, (x,)).float().square().sum()
    return loss


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_grad_is_autograds(strategy, dtype):
    model = shira_mlp(strategy, dtype)
    weight_before = [bits(m.weight).clone() for m in (model[0], model[2])]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(5, 17).to(dtype)
    got_params, got_x = grad(loss_of(model), argnums=(0, 1))(params, x)
    xr = x.clone().requires_grad_()
    model.zero_grad()
    model(xr).float().square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            same_bits(got_params[name], p.grad, name)
    same_bits(got_x, xr.grad, "x")
    for m, before in zip((model[0], model[2]), weight_before):  # swap wrote and restored W
        assert torch.equal(bits(m.weight), before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_per_sample_gradients_are_each_samples_own(strategy, dtype):
    model = shira_mlp(strategy, dtype)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    xs = torch.randn(4, 3, 17).to(dtype)  # 4 samples of 3 tokens
    per_sample = vmap(grad(loss_of(model)), in_dims=(None, 0))(params, xs)
    for b in range(xs.shape[0]):
        alone = grad(loss_of(model))(params, xs[b])
        for name in params:
            same_bits(per_sample[name][b], alone[name], f"sample {b}, {name}")


@pytest.mark.parametrize("strategy", ("spmm", "fold"))
def test_vmap_forward_and_jacrev(strategy):
    model = shira_mlp(strategy, torch.float32)
    xs = torch.randn(3, 2, 17)
    with torch.no_grad():
        same_bits(vmap(model)(xs), torch.stack([model(x) for x in xs]), "vmap(model)")
    x = torch.randn(2, 17)
    jac = jacrev(model)(x)
    expected = torch.autograd.functional.jacobian(model, x)
    assert jac.shape == expected.shape == (2, 9, 2, 17)
    same_bits(jac, expected, "jacrev")


def binary_weight(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    return BinaryWeight.from_float(torch.randn(out_f, in_f, generator=g), "row")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_binary_ops_take_grad_and_per_sample_vmap(dtype):
    bw, down, up = binary_weight(9, 40, 1), binary_weight(4, 40, 2), binary_weight(9, 4, 3)
    bias = torch.randn(9).to(dtype)

    def loss(x):
        y = binary_linear(x, bw, bias) + binary_lora(x, down, up, 0.5, "relu")
        return y.float().square().sum()

    xs = torch.randn(3, 2, 40).to(dtype)
    x = xs[0].clone().requires_grad_()
    loss(x).backward()
    same_bits(grad(loss)(xs[0]), x.grad, "grad")
    per_sample = vmap(grad(loss))(xs)
    for b in range(xs.shape[0]):
        same_bits(per_sample[b], grad(loss)(xs[b]), f"sample {b}")


def test_tuning_waits_for_a_call_outside_the_transform(monkeypatch, tmp_path):
    # "auto" under a transform took its measurement there: vmap refused the timed calls' random
    # inputs (a warning, and the static choice for the process), grad timed them as its own.
    import warnings
    from shira_kernels import tuning
    monkeypatch.setenv(tuning.MODE_ENV, "auto")
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    tuning.forget_decisions()
    try:
        model = shira_mlp("auto", torch.float32)
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            per_sample = vmap(grad(loss_of(model)), in_dims=(None, 0))(params,
                                                                       torch.randn(2, 3, 17))
            assert not tuning.measured_decisions()
            grad(loss_of(model))(params, torch.randn(3, 17))
            assert not tuning.measured_decisions()
        assert all(torch.isfinite(g).all() for g in per_sample.values())
        model(torch.randn(3, 17)).sum().backward()
        assert tuning.measured_decisions()
    finally:
        tuning.forget_decisions()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_product_add_takes_grad_and_per_sample_vmap(dtype):
    # The sparse product alone (a quantized base's output plus the adapter, MoSA's bottleneck).
    from shira_kernels import SparseDelta
    from shira_kernels.ops.sparse_delta import sparse_product_add
    g = torch.Generator().manual_seed(4)
    flat = torch.randperm(9 * 40, generator=g)[:30].sort().values
    values = (torch.randn(30, generator=g) * 0.1).to(dtype)
    x, y = torch.randn(3, 2, 40).to(dtype), torch.randn(3, 2, 9).to(dtype)

    def loss(v, xb, yb):
        delta = SparseDelta.from_flat(flat, (9, 40), v)
        return sparse_product_add(yb, xb, delta, 0.5).float().square().sum()

    vr, xr, yr = (t.clone().requires_grad_() for t in (values, x[0], y[0]))
    loss(vr, xr, yr).backward()
    got = grad(loss, argnums=(0, 1, 2))(values, x[0], y[0])
    for a, b, what in zip(got, (vr.grad, xr.grad, yr.grad), ("values", "x", "y")):
        same_bits(a, b, what)
    per_sample = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0, 0))(values, x, y)
    for b in range(x.shape[0]):
        alone = grad(loss, argnums=(0, 1))(values, x[b], y[b])
        same_bits(per_sample[0][b], alone[0], f"sample {b}, values")
        same_bits(per_sample[1][b], alone[1], f"sample {b}, x")
