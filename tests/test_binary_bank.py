"""BinaryAdapterBank: named 1-bit LoRA adapters served per batch row. Each row's output is the
same bits as its adapter's own model (BinaryLoRALinear layers) or the base, since every adapted
layer is the same dense matmul plus multi_binary_lora, whose groups are binary_lora on their rows
(test_multi_binary.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shira_kernels
from shira_kernels import BinaryAdapterBank
from shira_kernels.formats import BinaryWeight
from shira_kernels.nn import BinaryAdapter, BinaryLoRALinear
from shira_kernels.ops.binary import binary_lora

from conftest import DTYPES


def base_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(33, 20), nn.ReLU(), nn.Linear(20, 9), nn.Linear(9, 9)).to(dtype)


def tuned_copy(model, r, seed):
    """A copy of ``model`` whose layers "0" and "2" carry a packed 1-bit LoRA branch with random
    (non-zero) up weights, as after training."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for i in (0, 2):
        layer = BinaryLoRALinear.from_linear(tuned[i], r, scale=0.5 + seed)
        with torch.no_grad():
            layer.lora.up.copy_(torch.randn(layer.lora.up.shape, generator=g) * 0.1)
        tuned[i] = layer.pack()
    return tuned


def random_adapter(in_f, out_f, r, seed):
    g = torch.Generator().manual_seed(seed)
    return (BinaryWeight.from_float(torch.randn(r, in_f, generator=g)),
            BinaryWeight.from_float(torch.randn(out_f, r, generator=g) * 0.1, "row"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_batch_of_one_adapter_is_its_model_bit_for_bit(dtype):
    # All rows one adapter: the same dense matmuls and one group of all rows, which is
    # binary_lora on them, as the adapter's BinaryLoRALinear layers run it.
    model = base_model(dtype)
    tuned = {name: tuned_copy(model, r, seed) for name, r, seed in (("a", 4, 1), ("b", 7, 2))}
    bank = BinaryAdapterBank(model)
    for name, m in tuned.items():
        bank.add_from_model(name, m)
    assert bank.names == ("a", "b") and "a" in bank and len(bank) == 2
    x = torch.randn(6, 3, 33).to(dtype)
    gy = torch.randn(6, 3, 9).to(dtype)
    for name, expected in (("a", tuned["a"]), ("b", tuned["b"]), (None, model),
                           ("__base__", model)):
        xr = x.clone().requires_grad_()
        with bank.mixed([name] * 6):
            y = model(xr)
        gx, = torch.autograd.grad(y, xr, gy)
        xe = x.clone().requires_grad_()
        ye = expected(xe)
        assert torch.equal(y, ye), name
        assert torch.equal(gx, torch.autograd.grad(ye, xe, gy)[0]), name
    assert all("forward" not in m.__dict__ for m in model.modules())  # their own forwards back


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_rows_by_hand(dtype):
    # Each adapted layer: the base's matmul over the whole batch plus, on each adapter's rows,
    # binary_lora on those rows; adapters that touch different layers, scales multiplied.
    model = base_model(dtype)
    bank = BinaryAdapterBank(model)
    down, up = random_adapter(20, 9, 5, seed=3)
    lora = BinaryAdapter(9, 3, 9, scale=0.25, activation=None).pack()
    bank.add("c", {"2": (down, up, 2.0), "3": lora}, scale=3.0)
    assert bank.adapter("c")["2"][2] == 6.0 and bank.adapter("c")["3"][2] == 0.75
    d0, u0 = random_adapter(33, 20, 4, seed=4)
    bank.add("d", {"0": (d0, u0), "3": lora})
    x = torch.randn(5, 2, 33).to(dtype)
    names = ["c", "d", None, "c", "d"]
    with torch.no_grad(), bank.mixed(names):
        y = model(x)
    c, d = torch.tensor([0, 3]), torch.tensor([1, 4])
    ldown, lup = lora.binary_weights()
    with torch.no_grad():
        h0 = model[0](x)
        h0[d] += binary_lora(x[d], d0, u0, 1.0)
        h = torch.relu(h0)
        h2 = model[2](h)
        h2[c] += binary_lora(h[c], down, up, 6.0)
        h3 = model[3](h2)
        h3[c] += binary_lora(h2[c], ldown, lup, 0.75)
        h3[d] += binary_lora(h2[d], ldown, lup, 0.25)
    assert torch.equal(y, h3)


def test_refusals_change_nothing():
    model = base_model()
    bank = BinaryAdapterBank(model)
    down, up = random_adapter(20, 9, 5, seed=3)
    bank.add("ok", {"2": (down, up)})
    bad = [
        ({"2": (down, up), "nope": (down, up)}, KeyError, "no plain nn.Linear"),
        ({"2": (down, up), "0": (down, up)}, ValueError, "rank-r branch"),
        ({"2": BinaryAdapter(20, 3, 9)}, ValueError, "not a LoRA branch"),
        ({"2": (down.packed, up)}, TypeError, "down must be a BinaryWeight"),
        ({"2": "adapter"}, TypeError, "give a BinaryAdapter"),
        ({}, ValueError, "non-empty mapping"),
    ]
    for adapter, error, message in bad:
        with pytest.raises(error, match=message):
            bank.add("new", adapter)
        assert bank.names == ("ok",)
    for name in ("ok", "", "__base__", 3):
        with pytest.raises(ValueError, match="already in the bank" if name == "ok" else "name"):
            bank.add(name, {"2": (down, up)})
    with pytest.raises(ValueError, match="scale"):
        bank.add("new", {"2": (down, up, float("nan"))})
    assert bank.names == ("ok",)
    with pytest.raises(ValueError, match="no BinaryLoRALinear"):
        bank.add_from_model("new", base_model())
    with pytest.raises(KeyError, match="zzz"):
        bank.remove("zzz")
    bank.remove("ok")
    assert bank.names == ()


def test_mixed_refuses_what_it_cannot_do_and_restores_the_layers():
    model = base_model()
    bank = BinaryAdapterBank(model)
    bank.add_from_model("a", tuned_copy(model, 4, 1))
    x = torch.randn(2, 33)
    with pytest.raises(KeyError, match="zzz"):
        with bank.mixed(["zzz", None]):
            pass
    with pytest.raises(ValueError, match="layer '0': mixed batch of 3 rows"):
        with bank.mixed(["a", None, "a"]):
            model(x)
    for names in ([], None, "a"):
        with pytest.raises(ValueError, match="one name"):
            with bank.mixed(names):
                pass
    with pytest.raises(TypeError, match="str or None"):
        with bank.mixed(["a", 0]):
            pass
    with pytest.raises(RuntimeError, match="inside"):
        with bank.mixed(["a", None]):
            raise RuntimeError("inside")
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(x), base_model()(x))


def test_the_bank_shares_the_mixed_helpers_with_adapter_bank():
    # AdapterBank.mixed and BinaryAdapterBank.mixed refuse a list of names the same way.
    model = base_model()
    shira_bank = shira_kernels.AdapterBank(model)
    with pytest.raises(TypeError, match="str or None"):
        with shira_bank.mixed(["a", 0]):
            pass


def test_the_one_bit_example_runs_and_its_adapters_learn():
    # examples/one_bit_adapters.py in its quick mode: each packed adapter cuts its task's error
    # to under half the base's, is over 16x smaller than its fp32 branch, and a mixed batch's
    # rows match their own adapter's model.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "one_bit_adapters.py"
    spec = importlib.util.spec_from_file_location("one_bit_adapters", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--quick"])
    for task in ("task1", "task2"):
        r = results[task]
        assert r["error_adapted"] < 0.5 * r["error_base"], (task, r)
        assert r["fp32_bytes"] > 16 * r["packed_bytes"], (task, r)
    # The same dense matmuls; each row's 1-bit branch is the same bits, or (where the two row
    # counts fall in token classes tuned to different strategies) the same fp32 sums of ≤ 64
    # terms in another order: a few units of fp32 rounding on outputs of order 1, far under
    # 1e-5, where another adapter's row would differ by its branch, about 1e-1.
    assert results["mixed_max_gap"] <= 1e-5


def test_mixed_blocks_in_two_threads_take_turns_and_stay_right():
    import threading

    model = base_model()
    bank = BinaryAdapterBank(model)
    for name, r, seed in (("a", 4, 1), ("b", 7, 2)):
        bank.add_from_model(name, tuned_copy(model, r, seed))
    cases = [(["a", None, "b"], torch.randn(3, 33)), (["b", "b", "a", None], torch.randn(4, 33))]
    expected = []
    for names, x in cases:
        with torch.no_grad(), bank.mixed(names):
            expected.append(model(x))
    errors = []

    def serve(i):
        names, x = cases[i]
        for _ in range(20):
            with torch.no_grad(), bank.mixed(names):
                if not torch.equal(model(x), expected[i]):
                    errors.append(i)
    threads = [threading.Thread(target=serve, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(model(cases[0][1]), base_model()(cases[0][1]))


def test_the_one_bit_guide_runs_as_written(monkeypatch):
    # docs/methods/one_bit_adapters.md's example, with tuning off so that every binary_lora
    # runs the table lookup: each mixed row is then the bits of its own adapter's model on the
    # same batch (the same dense matmuls; each row's 1-bit sums do not depend on the other
    # rows), and each trained adapter imitates its teacher better than the base does.
    import re
    from pathlib import Path

    monkeypatch.setenv("SHIRA_KERNELS_TUNE", "off")
    guide = Path(__file__).resolve().parents[1] / "docs" / "methods" / "one_bit_adapters.md"
    code = re.search(r"## Use\n\n```python\n(.*?)```", guide.read_text(), re.S).group(1)
    namespace = {}
    exec(compile(code, str(guide), "exec"), namespace)
    base, x, y = namespace["base"], namespace["x"], namespace["y"]
    tuned, teachers = namespace["tuned"], namespace["teachers"]
    held_out = torch.randn(256, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        own = {None: base(x), **{name: model(x) for name, model in tuned.items()}}
        for row, name in enumerate(["a", "b", None, "a"]):
            assert torch.equal(y[row], own[name][row]), (row, name)
        for name, model in tuned.items():
            teacher = teachers[name]
            assert F.mse_loss(model(held_out), teacher(held_out)) < \
                F.mse_loss(base(held_out), teacher(held_out)), name


def test_two_banks_on_one_model_cannot_both_serve_a_layer():
    # Two banks of one model (here a 1-bit one and a SHiRA one), their blocks in two threads:
    # had the second block gone ahead, whichever ended last would have put the other's mixed
    # forward back for good. The second is refused, changes nothing, and after the first ends
    # the model is the base again.
    import threading

    model = base_model()
    x = torch.randn(2, 33)
    with torch.no_grad():
        expected = model(x)
    binary = BinaryAdapterBank(model)
    binary.add_from_model("a", tuned_copy(model, 4, 1))
    sparse = shira_kernels.AdapterBank(model)
    sparse.add("s", {"0": shira_kernels.SparseDelta.from_flat(
        torch.arange(0, 660, 11), (20, 33), torch.ones(60))})
    inside, leave, refused = threading.Event(), threading.Event(), []

    def first():
        with binary.mixed(["a", "a"]):
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(30)
    try:
        with pytest.raises(RuntimeError, match="already serves another mixed"):
            with sparse.mixed(["s", None]):
                pass
    finally:
        leave.set()
        thread.join(30)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
        assert all("forward" not in m.__dict__ for m in model)
        with sparse.mixed(["s", None]):  # the layers are free again
            assert not torch.equal(model(x)[0], expected[0])
            with pytest.raises(RuntimeError, match="already serves another mixed"):
                with binary.mixed(["a", None]):  # nested in the same thread
                    pass
            assert not torch.equal(model(x)[0], expected[0])  # still the sparse block's
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("bad", ["alpha", "mu"])
def test_add_refuses_a_non_finite_scale_and_adds_nothing(bad):
    # The first layer's branch is sound, the second's up has a NaN: nothing is added.
    model = base_model()
    bank = BinaryAdapterBank(model)
    tuned = tuned_copy(model, 3, 1)
    first, (down, up) = tuned[0].lora, tuned[2].lora.binary_weights()
    broken = BinaryWeight(up.packed, up.alpha.clone(), up.mu.clone(), up.shape[1])
    getattr(broken, bad)[0] = float("nan")
    with pytest.raises(ValueError, match="layer '2': up's α or μ is not finite"):
        bank.add("a", {"0": first, "2": (down, broken)})
    assert "a" not in bank and len(bank) == 0


def test_add_and_remove_inside_a_mixed_block_are_refused():
    # The block's rows are fixed to slots when it starts: a remove then add in the block's own
    # thread (the lock is re-entrant) would make the rows of the removed adapter run the new one.
    model = base_model()
    bank = BinaryAdapterBank(model)
    bank.add("a", {"0": random_adapter(33, 20, 4, 1)})
    bank.add("b", {"0": random_adapter(33, 20, 4, 2)})
    x = torch.randn(2, 33)
    with torch.no_grad(), bank.mixed(["a", "b"]):
        y = model(x)
        with pytest.raises(RuntimeError, match="mixed\\(\\) block is open; remove"):
            bank.remove("a")
        with pytest.raises(RuntimeError, match="mixed\\(\\) block is open; add"):
            bank.add("c", {"0": random_adapter(33, 20, 4, 3)})
        assert bank.names == ("a", "b")
        assert torch.equal(model(x), y)
    bank.remove("a")
    bank.add("c", {"0": random_adapter(33, 20, 4, 3)})
