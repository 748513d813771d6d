"""PEFT interoperability: SHiRA checkpoints that PEFT writes go into an AdapterBank and come out
in a form PEFT loads (outputs compared with PEFT's own), and accelerate() runs PEFT's ShiRA
layers on this package's kernels with PEFT's outputs, gradients, training, saving and
bookkeeping (and an exact unmerge)."""
import copy
import io
import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

pytest.importorskip("peft")
from peft import PeftModel, ShiraConfig, get_peft_model  # noqa: E402
from peft.tuners.shira.layer import Linear as PeftShiraLinear  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from shira_kernels import AdapterBank, SparseDelta  # noqa: E402
from shira_kernels.integrations import peft as skpeft  # noqa: E402
from tolerance import assert_within_error_bound  # noqa: E402

TARGETS = ["fc1", "fc2", "blocks.0.0"]
SHAPES = {"fc1": (24, 16), "fc2": (12, 24), "blocks.0.0": (8, 12)}
R = 2


@pytest.fixture(autouse=True)
def _quiet():
    # PEFT warns on every sparse_coo_tensor and on repeated merges; not what these tests check.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Tiny(nn.Module):
    def __init__(self, fc1_out=24):
        super().__init__()
        self.fc1 = nn.Linear(16, fc1_out)
        self.fc2 = nn.Linear(fc1_out, 12, bias=False)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(12, 8))])

    def forward(self, x):
        return self.blocks[0](torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny(dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    return Tiny(**kwargs).to(dtype)


def randomize(model, seed=5, std=0.3, adapter="default"):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(f"shira_weight.{adapter}"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def shira(base, seed=1, values_seed=5, **config):
    config = {"r": R, "target_modules": TARGETS, "random_seed": seed, **config}
    model = get_peft_model(copy.deepcopy(base), ShiraConfig(**config))
    randomize(model, values_seed)
    return model


def bits(t):
    t = t.detach()
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def snapshot(model):
    return {k: bits(v).clone() for k, v in model.state_dict().items()}


def same_bits(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def shira_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "shira_weight" in n}


# =============================================================================================
# Checkpoints
# =============================================================================================
def test_add_peft_matches_peft(tmp_path):
    base = tiny()
    pm = shira(base)
    pm.save_pretrained(tmp_path)
    x = torch.randn(5, 16)
    bank = AdapterBank(copy.deepcopy(base))
    y_base = bank.model(x)
    bank.add_peft("a", tmp_path)
    assert set(bank.deltas("a")) == set(TARGETS)
    bank.activate("a")
    y_bank = bank.model(x)
    merged = copy.deepcopy(pm).merge_and_unload()
    torch.testing.assert_close(y_bank, merged(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_bank, pm(x), rtol=1e-5, atol=1e-5)
    bank.deactivate()
    assert torch.equal(bank.model(x), y_base)

    # PEFT's scaling (set_scale at inference; not saved) is add_peft's scale.
    for module in pm.modules():
        if isinstance(module, PeftShiraLinear):
            module.set_scale("default", 0.5)
    bank.add_peft("half", tmp_path, scale=0.5)
    bank.activate("half")
    torch.testing.assert_close(bank.model(x), pm(x), rtol=1e-5, atol=1e-5)


def test_add_peft_non_default_adapter_and_windows_indices(tmp_path):
    base = tiny()
    pm = shira(base)
    pm.add_adapter("other", ShiraConfig(r=R, target_modules=["fc1"], random_seed=9))
    randomize(pm, seed=11, adapter="other")
    pm.save_pretrained(tmp_path, selected_adapters=["other"])
    bank = AdapterBank(copy.deepcopy(base))
    with pytest.raises(ValueError, match="subdirectory.*other"):
        bank.add_peft("o", tmp_path)
    # PEFT on Windows stores the indices as float32; they are read as integers.
    file = tmp_path / "other" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors = {k: v.float() if k.endswith("shira_indices") else v for k, v in tensors.items()}
    save_file(tensors, file)
    bank.add_peft("o", tmp_path / "other")
    pm.set_adapter("other")
    bank.activate("o")
    x = torch.randn(4, 16)
    torch.testing.assert_close(bank.model(x), pm(x), rtol=1e-5, atol=1e-5)


def test_add_peft_and_save_peft_inside_inference_mode(tmp_path):
    base = tiny()
    shira(base).save_pretrained(tmp_path / "peft")
    banks = [AdapterBank(copy.deepcopy(base)) for _ in range(2)]
    banks[0].add_peft("a", tmp_path / "peft")
    with torch.inference_mode():  # the checkpoint's tensors are inference tensors here
        banks[1].add_peft("a", tmp_path / "peft")
    before = snapshot(banks[1].model)
    for inside in (False, True, False):
        with torch.inference_mode(inside):
            for bank in banks:
                bank.activate("a")
            assert same_bits(snapshot(banks[1].model), snapshot(banks[0].model))
            assert not same_bits(snapshot(banks[1].model), before)
            for bank in banks:
                bank.deactivate()
    assert same_bits(snapshot(banks[1].model), before)
    banks[0].save_peft("a", tmp_path / "out0")
    with torch.inference_mode():
        banks[1].save_peft("a", tmp_path / "out1")
    saved = [load_file(tmp_path / d / "adapter_model.safetensors") for d in ("out0", "out1")]
    assert same_bits(saved[0], saved[1])


def random_bank_adapter(gen, scales):
    adapter = {}
    for layer, shape in SHAPES.items():
        nnz = R * (shape[0] + shape[1])
        flat = torch.randperm(shape[0] * shape[1], generator=gen)[:nnz]
        adapter[layer] = (SparseDelta.from_flat(flat, shape, torch.randn(nnz, generator=gen)),
                          scales.get(layer, 1.0))
    return adapter


def test_save_peft_loads_in_peft(tmp_path):
    base = tiny()
    bank = AdapterBank(copy.deepcopy(base))
    bank.add("a", random_bank_adapter(torch.Generator().manual_seed(3), {"fc2": 0.5}))
    assert bank.save_peft("a", tmp_path / "out", base_model_name_or_path="tiny") == R
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["r"] == R
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    x = torch.randn(6, 16)
    bank.activate("a")
    torch.testing.assert_close(loaded(x), bank.model(x), rtol=1e-5, atol=1e-5)
    # ... and back: the scale is folded into the values.
    other = AdapterBank(copy.deepcopy(base))
    other.add_peft("b", tmp_path / "out")
    for layer, (delta, scale) in bank.deltas("a").items():
        back, back_scale = other.deltas("b")[layer]
        assert back_scale == 1.0 and torch.equal(back.flat_indices, delta.flat_indices)
        torch.testing.assert_close(back.values, delta.values * scale)


def test_tiny_llama_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    pm = get_peft_model(copy.deepcopy(base), ShiraConfig(
        r=2, target_modules=["q_proj", "v_proj", "down_proj"], random_seed=4))
    randomize(pm, std=0.2)
    pm.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 64, (1, 7))
    bank = AdapterBank(copy.deepcopy(base))
    bank.add_peft("a", tmp_path / "peft")
    assert "model.layers.0.mlp.down_proj" in bank.deltas("a")
    bank.activate("a")
    logits = bank.model(ids).logits
    torch.testing.assert_close(logits, pm(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    bank.save_peft("a", tmp_path / "ours")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)


def _edit_tensors(fn):
    def edit(directory):
        file = directory / "adapter_model.safetensors"
        tensors = load_file(file)
        fn(tensors)
        save_file(tensors, file)
    return edit


def _edit_config(**changes):
    def edit(directory):
        file = directory / "adapter_config.json"
        config = json.loads(file.read_text())
        config.update(changes)
        file.write_text(json.dumps(config))
    return edit


W1, I1 = "base_model.model.fc1.shira_weight", "base_model.model.fc1.shira_indices"


def _rename_fc1(t):
    t["base_model.model.fc9.shira_weight"] = t.pop(W1)
    t["base_model.model.fc9.shira_indices"] = t.pop(I1)


def _repeat_entry(t):
    t[I1][:, 1] = t[I1][:, 0]


def _out_of_range(t):
    t[I1][0, -1] = 100


CORRUPTIONS = {
    "no config": (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model"),
    "bad json": (lambda d: (d / "adapter_config.json").write_text("{"), "JSON"),
    "not shira": (_edit_config(peft_type="LORA"), "SHIRA"),
    "bad r": (_edit_config(r=0), "r must be"),
    "wrong r": (_edit_config(r=3), "blocks.0.0.*shape mismatch"),
    "unknown layer": (_edit_tensors(_rename_fc1), "fc9"),
    "missing indices": (_edit_tensors(lambda t: t.pop(I1)), "fc1.*shira_indices"),
    "extra tensor": (_edit_tensors(lambda t: t.update({"base_model.model.head.weight":
                                                       torch.zeros(2)})), "head.weight"),
    "indices shape": (_edit_tensors(lambda t: t.update({I1: t[I1].reshape(-1)})), r"\[2, nnz\]"),
    "fractional indices": (_edit_tensors(lambda t: t.update({I1: t[I1].float() + 0.5})),
                           "not whole"),
    "nan value": (_edit_tensors(lambda t: t[W1].__setitem__(0, float("nan"))), "non-finite"),
    "value count": (_edit_tensors(lambda t: t.update({W1: t[W1][:-1].clone()})), "fc1"),
    "out of range": (_edit_tensors(_out_of_range), "fc1.*shape mismatch"),
    "repeated entry": (_edit_tensors(_repeat_entry), "fc1.*repeated"),
    "truncated": (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-7]), "safetensors"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_add_peft_errors_change_nothing(tmp_path, corruption):
    base = tiny()
    shira(base).save_pretrained(tmp_path)
    edit, message = CORRUPTIONS[corruption]
    edit(tmp_path)
    bank = AdapterBank(copy.deepcopy(base))
    bank.add("x", random_bank_adapter(torch.Generator().manual_seed(0), {}))
    bank.activate("x")
    before = snapshot(bank.model)
    with pytest.raises(ValueError, match=message):
        bank.add_peft("a", tmp_path)
    assert bank.names == ("x",) and bank.active == "x" and same_bits(snapshot(bank.model), before)


def test_add_peft_other_model_and_name_errors(tmp_path):
    base = tiny()
    shira(tiny(fc1_out=32)).save_pretrained(tmp_path / "wide")
    shira(base).save_pretrained(tmp_path / "ok")
    bank = AdapterBank(copy.deepcopy(base))
    with pytest.raises(ValueError, match="'fc1'.*shape mismatch"):
        bank.add_peft("a", tmp_path / "wide")
    bank.add_peft("a", tmp_path / "ok")
    with pytest.raises(ValueError, match="already"):
        bank.add_peft("a", tmp_path / "ok")
    assert bank.names == ("a",)


def test_save_peft_errors(tmp_path):
    bank = AdapterBank(tiny())
    gen = torch.Generator().manual_seed(0)
    bank.add("odd", {"fc1": SparseDelta.from_flat(torch.arange(7), (24, 16),
                                                  torch.randn(7, generator=gen))})
    uneven = random_bank_adapter(gen, {})
    uneven["fc2"] = (SparseDelta.from_flat(torch.arange(3 * 36), (12, 24),
                                           torch.randn(108, generator=gen)), 1.0)
    bank.add("uneven", uneven)
    with pytest.raises(ValueError, match="fc1.*multiple of 40"):
        bank.save_peft("odd", tmp_path / "odd")
    with pytest.raises(ValueError, match="fc2.*r = 3"):
        bank.save_peft("uneven", tmp_path / "uneven")
    with pytest.raises(KeyError):
        bank.save_peft("missing", tmp_path / "missing")
    assert not any(tmp_path.iterdir())


def test_the_format_needs_only_layer_shapes_and_the_old_names_still_work(tmp_path):
    from shira_kernels.io import peft_format

    base = tiny()
    shira(base).save_pretrained(tmp_path / "peft")
    # No bank, no model: the layers' shapes are all the format needs.
    deltas = peft_format.peft_adapter_deltas(tmp_path / "peft", SHAPES, scale=0.5)
    bank = AdapterBank(copy.deepcopy(base))
    skpeft.load_peft_into_bank(bank, "a", tmp_path / "peft", scale=0.5)
    assert set(deltas) == set(bank.deltas("a")) == set(TARGETS)
    for layer, (delta, scale) in bank.deltas("a").items():
        assert scale == deltas[layer][1] == 0.5 and delta.shape == SHAPES[layer]
        assert torch.equal(delta.flat_indices, deltas[layer][0].flat_indices)
        assert torch.equal(bits(delta.values), bits(deltas[layer][0].values))
    # A PEFT-wrapped model's layers are P.base_layer.
    wrapped = {f"base_model.model.{k}.base_layer": v for k, v in SHAPES.items()}
    assert set(peft_format.peft_adapter_deltas(tmp_path / "peft", wrapped)) == set(wrapped)
    with pytest.raises(ValueError, match="blocks.0.0.*shape mismatch"):
        peft_format.peft_adapter_deltas(tmp_path / "peft", {**SHAPES, "blocks.0.0": (8, 13)})
    with pytest.raises(ValueError, match="no layer 'blocks.0.0'"):
        peft_format.peft_adapter_deltas(tmp_path / "peft", {"fc1": SHAPES["fc1"]})
    with pytest.raises(TypeError, match="layer_shapes"):
        peft_format.peft_adapter_deltas(tmp_path / "peft", [("fc1", (24, 16))])
    with pytest.raises(TypeError, match="'fc1': in"):
        peft_format.peft_adapter_deltas(tmp_path / "peft", {**SHAPES, "fc1": (24, 16.0)})
    # Everything integrations.peft offered is still there: the format's names are the same
    # objects, and the bank functions are the bank's methods.
    for name in ("CONFIG_NAME", "PEFT_PREFIX", "SAFETENSORS_NAME", "BIN_NAME",
                 "read_peft_adapter", "peft_adapter_deltas", "write_peft_adapter"):
        assert getattr(skpeft, name) is getattr(peft_format, name)
    assert set(skpeft.__all__) <= set(dir(skpeft))
    assert skpeft.save_bank_as_peft(bank, "a", tmp_path / "out") == R
    assert peft_format.read_peft_adapter(tmp_path / "out")[0]["r"] == R


@pytest.mark.parametrize("scale, error", [
    ("2.0", TypeError), (True, TypeError), (None, TypeError), ([1.0], TypeError),
    (float("nan"), ValueError), (float("inf"), ValueError), (10**400, ValueError)], ids=repr)
def test_a_scale_that_is_not_a_finite_number_is_refused(tmp_path, scale, error):
    # One rule for every scale of the package (_checks.check_scale): TypeError for what is not
    # a real number, ValueError for a number that is not finite.
    from shira_kernels.io.peft_format import peft_adapter_deltas, write_peft_adapter

    base = tiny()
    shira(base).save_pretrained(tmp_path / "peft")
    bank = AdapterBank(copy.deepcopy(base))
    before = snapshot(bank.model)
    with pytest.raises(error, match="^scale must be"):
        bank.add_peft("a", tmp_path / "peft", scale=scale)
    with pytest.raises(error, match="^scale must be"):
        peft_adapter_deltas(tmp_path / "peft", SHAPES, scale=scale)
    assert bank.names == () and same_bits(snapshot(bank.model), before)
    delta = random_bank_adapter(torch.Generator().manual_seed(0), {})["fc1"][0]
    with pytest.raises(error, match="^layer 'fc1': scale must be"):
        write_peft_adapter(tmp_path / "out", {"fc1": (delta, scale)})
    assert not (tmp_path / "out").exists()


# =============================================================================================
# accelerate
# =============================================================================================
@pytest.mark.parametrize("strategy", ["auto", "fold", "spmm", "swap"])
def test_accelerate_matches_peft_training(strategy):
    pm = shira(tiny())
    pa = skpeft.accelerate(copy.deepcopy(pm), strategy=strategy)
    assert skpeft.accelerated_layers(pa) == [f"base_model.model.{t}" for t in TARGETS]
    assert same_bits(snapshot(pa), snapshot(pm))
    params = {n: p for n, p in pa.named_parameters()}
    assert [n for n, p in params.items() if p.requires_grad] == [
        n for n, p in pm.named_parameters() if p.requires_grad]
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (pm, pa)]
    for step in range(2):
        x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(step))
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(xi) for m, xi in zip((pm, pa), xs)]
        torch.testing.assert_close(ys[1], ys[0], rtol=1e-5, atol=1e-5)
        for y in ys:
            y.square().mean().backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)
        ga, gm = shira_grads(pa), shira_grads(pm)
        for name in gm:
            torch.testing.assert_close(ga[name], gm[name], rtol=1e-4, atol=1e-6)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    sa, sm = pa.state_dict(), pm.state_dict()
    assert sa.keys() == sm.keys()
    for k in sm:
        torch.testing.assert_close(sa[k], sm[k], rtol=1e-4, atol=1e-5)
    assert all(params[n] is p for n, p in pa.named_parameters())  # the same Parameters
    assert all(p.grad is None for n, p in pa.named_parameters() if "base_layer" in n)


class _WeightSized(TorchDispatchMode):
    """Records ops whose output is a dense tensor of a weight's shape that is not the weight
    itself (or a view of it)."""

    def __init__(self, weights):
        super().__init__()
        self.shapes = {tuple(w.shape) for w in weights}
        self.storages = {w.untyped_storage().data_ptr() for w in weights}
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.layout == torch.strided
                    and tuple(t.shape) in self.shapes
                    and t.untyped_storage().data_ptr() not in self.storages):
                self.hits.append(str(func))
        return out


@pytest.mark.parametrize("tokens", [3, 40])
def test_accelerate_makes_no_dense_weight_or_gradient(tokens):
    pm = shira(tiny())
    pa = skpeft.accelerate(copy.deepcopy(pm))
    x = torch.randn(tokens, 16)
    found = {}
    for label, model in (("peft", pm), ("accelerated", pa)):
        weights = [m.get_base_layer().weight for m in model.modules()
                   if isinstance(m, PeftShiraLinear)]
        with _WeightSized(weights) as mode:
            model(x.clone().requires_grad_()).square().mean().backward()
        found[label] = mode.hits
    assert found["peft"], "the check must see PEFT's dense weight copies"
    assert found["accelerated"] == []


def test_accelerate_bookkeeping():
    base = tiny()
    pm = shira(base)
    pm.add_adapter("b", ShiraConfig(r=R, target_modules=["fc1", "fc2"], random_seed=7))
    randomize(pm, seed=8, adapter="b")
    pa = skpeft.accelerate(copy.deepcopy(pm))
    x = torch.randn(20, 16)

    def check(tol=1e-5):
        torch.testing.assert_close(pa(x), pm(x), rtol=tol, atol=tol)

    check()
    with pa.disable_adapter(), pm.disable_adapter():
        torch.testing.assert_close(pa(x), base(x))
        check()
    for active in ("b", ["default", "b"], "default"):  # two active: PEFT's own forward
        for m in (pm, pa):
            m.base_model.set_adapter(active)
        check()
    weights = {n: bits(p).clone() for n, p in pa.named_parameters() if "base_layer.weight" in n}
    for m in (pm, pa):
        m.merge_adapter()
    check()
    with pa.disable_adapter(), pm.disable_adapter():  # unmerges, as PEFT does
        check()
    assert all(torch.equal(bits(p), weights[n]) for n, p in pa.named_parameters() if n in weights)
    for m in (pm, pa):
        m.merge_adapter(["default", "b"])
        m.unmerge_adapter()
    assert all(torch.equal(bits(p), weights[n]) for n, p in pa.named_parameters() if n in weights)
    check()
    for m in (pm, pa):
        m.delete_adapter("b")
    check()
    merged_a, merged_m = copy.deepcopy(pa).merge_and_unload(), copy.deepcopy(pm).merge_and_unload()
    assert type(merged_a.fc1) is nn.Linear
    torch.testing.assert_close(merged_a(x), merged_m(x), rtol=1e-5, atol=1e-5)


def test_accelerate_save_and_load(tmp_path):
    base = tiny()
    pm = shira(base)
    pa = skpeft.accelerate(copy.deepcopy(pm))
    x = torch.randn(8, 16)
    pa(x).square().mean().backward()
    torch.optim.SGD([p for p in pa.parameters() if p.requires_grad], lr=0.1).step()
    pa.save_pretrained(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for name, p in pa.named_parameters():
        if "shira_weight" in name:
            key = name.replace(".default", "")
            assert torch.equal(saved[key], p.detach())
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(loaded(x), pa(x), rtol=1e-5, atol=1e-5)
    skpeft.accelerate(loaded)
    torch.testing.assert_close(loaded(x), pa(x), rtol=1e-5, atol=1e-5)
    bank = AdapterBank(copy.deepcopy(base))
    bank.add_peft("trained", tmp_path / "a")
    bank.activate("trained")
    torch.testing.assert_close(bank.model(x), pa(x), rtol=1e-5, atol=1e-5)


def test_accelerate_bf16_unmerge_is_exact():
    pm = shira(tiny(torch.bfloat16))
    pa = skpeft.accelerate(copy.deepcopy(pm))
    x = torch.randn(20, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(pa(x), pm(x), rtol=3e-2, atol=3e-2)
    layers = {label: [m for m in model.modules() if isinstance(m, PeftShiraLinear)]
              for label, model in (("peft", pm), ("accelerated", pa))}
    before = {label: [bits(m.get_base_layer().weight).clone() for m in ms]
              for label, ms in layers.items()}
    drift = {}
    for label, model in (("peft", pm), ("accelerated", pa)):
        for _ in range(3):
            model.merge_adapter()
            if label == "accelerated":
                merged = [m.get_base_layer().weight.detach().float().clone() for m in layers[label]]
            model.unmerge_adapter()
        drift[label] = sum(int((bits(m.get_base_layer().weight) != b).sum())
                           for m, b in zip(layers[label], before[label]))
    total = sum(m.shira_weight["default"].numel() for m in layers["peft"])
    print(f"\nbf16, 3 merge/unmerge rounds: entries differing from the base: PEFT "
          f"{drift['peft']} of {total} adapted, accelerated {drift['accelerated']}")
    assert drift["accelerated"] == 0
    # The merged weights are W + S rounded once, what PEFT's merge computes.
    pm.merge_adapter()
    for m, w in zip(layers["peft"], merged):
        torch.testing.assert_close(m.get_base_layer().weight.float(), w, rtol=1e-2, atol=1e-2)


def test_accelerate_errors_restore_copy():
    with pytest.raises(ValueError, match="no PEFT SHiRA layer"):
        skpeft.accelerate(tiny())
    pm = shira(tiny())
    with pytest.raises(ValueError, match="strategy"):
        skpeft.accelerate(pm, strategy="dense")
    pa = skpeft.accelerate(copy.deepcopy(pm))
    x = torch.randn(5, 16)
    torch.testing.assert_close(copy.deepcopy(pa)(x), pm(x), rtol=1e-5, atol=1e-5)
    pa.merge_adapter()
    skpeft.restore(pa)
    assert skpeft.accelerated_layers(pa) == []
    assert type(pa.base_model.model.fc1) is PeftShiraLinear
    torch.testing.assert_close(pa(x), pm(x), rtol=1e-5, atol=1e-5)
    pa.unmerge_adapter()  # PEFT's own unmerge now
    torch.testing.assert_close(pa(x), pm(x), rtol=1e-5, atol=1e-5)


# =============================================================================================
# PEFT's own SHiRA test patterns against accelerate(), with torch.inference_mode (PEFT runs its
# forwards inside it, the first one included): test_unload_adapter on small transformers
# models built from configs (no downloads), test_merge_layers_multi, and the save / load round
# trip on a custom MLP.
# =============================================================================================
def _transformers_models():
    import transformers as T

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    causal = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, **ids)
    encoder = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=40, **ids)
    return {
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
            max_position_embeddings=32, word_embed_proj_dim=16, **ids)),
        "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(
            vocab_size=64, n_embd=16, n_layer=1, n_head=2, rotary_dim=4, n_positions=32, **ids)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**causal)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**causal)),
        "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(
            **{**causal, "num_key_value_heads": 1}, head_dim=8)),
        "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
            decoder_ffn_dim=32, max_position_embeddings=32, **ids)),
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            decoder_start_token_id=0, **ids)),
        "bert": lambda: T.BertModel(T.BertConfig(**encoder)),
        "roberta": lambda: T.RobertaModel(T.RobertaConfig(**encoder)),
        "deberta-v2": lambda: T.DebertaV2Model(T.DebertaV2Config(**encoder)),
    }


HF_MODELS = ["opt", "gptj", "llama", "qwen2", "gemma3", "bart", "t5", "bert", "roberta",
             "deberta-v2"]


def hf_model(name, seed=0):
    pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return _transformers_models()[name]().eval()


def hf_inputs(model):
    ids = torch.tensor([[1, 5, 9, 13, 4, 7], [3, 8, 11, 6, 12, 10]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids[:, :4]
    return inputs


def logits(model, inputs):
    return model(**inputs)[0]


def hf_shira(base, seed=0, **config):
    # init_weights=False: random values (PEFT's tests use it so that the adapter changes the
    # outputs); the default target modules of the model type.
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), ShiraConfig(r=1, init_weights=False, **config))


def base_weights(model):
    return {n: bits(p).clone() for n, p in model.named_parameters() if "shira" not in n}


@pytest.mark.parametrize("name", HF_MODELS)
def test_accelerate_unload_adapter_pattern(name):
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = hf_model(name)
    inputs = hf_inputs(base)
    with torch.no_grad():
        logits_base = logits(base, inputs)
    num_params_base = len(base.state_dict())
    pm = hf_shira(base)
    pa = skpeft.accelerate(copy.deepcopy(pm))
    assert skpeft.accelerated_layers(pa)
    with torch.inference_mode():  # the first forward of the accelerated model
        logits_adapter = logits(pa, inputs)
        logits_peft = logits(pm, inputs)
    torch.testing.assert_close(logits_adapter, logits_peft, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits_adapter, logits_base, atol=1e-3, rtol=1e-3)
    with torch.inference_mode():
        unloaded = pa.unload()
        logits_unload = logits(unloaded, inputs)
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    assert len(unloaded.state_dict()) == num_params_base
    assert torch.equal(bits(logits_unload), bits(logits_base))  # the base model, exactly
    assert same_bits(base_weights(unloaded), base_weights(base))
    # Training still works on an accelerated model whose first forward ran in inference_mode.
    pa2 = skpeft.accelerate(copy.deepcopy(pm))
    with torch.inference_mode():
        logits(pa2, inputs)
    logits(pa2, inputs).square().mean().backward()
    logits(pm, inputs).square().mean().backward()
    ga, gm = shira_grads(pa2), shira_grads(pm)
    assert ga.keys() == gm.keys() and ga
    for key in gm:
        torch.testing.assert_close(ga[key], gm[key], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["opt", "llama", "bert", "t5"])
@pytest.mark.parametrize("merge_inside", [False, True], ids=["merge", "merge-in-inference"])
def test_accelerate_merge_layers_multi_pattern(name, merge_inside):
    base = hf_model(name)
    inputs = hf_inputs(base)
    models = {}
    for label in ("peft", "accelerated"):
        torch.manual_seed(1)
        model = get_peft_model(copy.deepcopy(base), ShiraConfig(r=1, init_weights=False))
        if label == "accelerated":
            skpeft.accelerate(model)
        model.eval()
        models[label] = model
    pa, pm = models["accelerated"], models["peft"]
    with torch.inference_mode():
        logits_1 = logits(pa, inputs)
    for model in (pm, pa):
        torch.manual_seed(2)
        model.add_adapter("adapter-2", ShiraConfig(r=1, init_weights=False))
        model.set_adapter("adapter-2")
        model.eval()
    assert skpeft.accelerated_layers(pa)  # the new adapter lives in the accelerated layers
    with torch.inference_mode():
        logits_2 = logits(pa, inputs)
        torch.testing.assert_close(logits_2, logits(pm, inputs), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits_1, logits_2, atol=1e-3, rtol=1e-3)
    pa.set_adapter("default")
    pm.set_adapter("default")
    with torch.inference_mode():
        assert torch.equal(bits(logits(pa, inputs)), bits(logits_1))
        torch.testing.assert_close(logits_1, logits(pm, inputs), rtol=1e-4, atol=1e-4)

    # merge_adapter of both adapters, then unmerge: the base weights come back bit for bit.
    before = base_weights(pa)
    both = copy.deepcopy(pa)
    with torch.inference_mode(merge_inside):
        both.base_model.merge_adapter(["adapter-2", "default"])
    with torch.inference_mode():
        logits_both = logits(both, inputs)
    both.unmerge_adapter()
    assert same_bits(base_weights(both), before)

    copies = {"a": copy.deepcopy(pa), "b": copy.deepcopy(pa)}
    peft_copy = copy.deepcopy(pm)
    with torch.inference_mode(merge_inside):
        merged_all = pa.merge_and_unload(adapter_names=["adapter-2", "default"])
        merged_all_peft = peft_copy.merge_and_unload(adapter_names=["adapter-2", "default"])
    with torch.inference_mode():
        logits_all = logits(merged_all, inputs)
        torch.testing.assert_close(logits_all, logits(merged_all_peft, inputs), rtol=1e-4,
                                   atol=1e-4)
    assert torch.equal(bits(logits_all), bits(logits_both))
    assert not torch.allclose(logits_all, logits_2, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(logits_all, logits_1, atol=1e-3, rtol=1e-3)
    for key, adapter, expected in (("a", "adapter-2", logits_2), ("b", "default", logits_1)):
        with torch.inference_mode(merge_inside):
            merged = copies[key].merge_and_unload(adapter_names=[adapter])
        with torch.inference_mode():
            torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-4, atol=1e-4)


class PeftMLP(nn.Module):
    """The custom MLP of PEFT's SHiRA tests (two layers of one shape)."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 40)
        self.lin2 = nn.Linear(40, 30)
        self.lin3 = nn.Linear(30, 10)

    def forward(self, x):
        x = torch.relu(self.lin0(x))
        x = torch.relu(self.lin1(x))
        x = torch.relu(self.lin2(x))
        return torch.log_softmax(self.lin3(x), dim=-1)


def peft_mlp():
    torch.manual_seed(0)
    return PeftMLP()


@pytest.mark.parametrize("where", ["outside", "forward-inside", "load-inside"])
def test_accelerate_save_load_roundtrip_pattern(tmp_path, where):
    pm = get_peft_model(peft_mlp(), ShiraConfig(r=2, target_modules=["lin1", "lin2"],
                                                random_seed=56), adapter_name="first")
    pm.add_adapter("second", ShiraConfig(r=3, target_modules=["lin1", "lin2", "lin3"],
                                         random_seed=67))
    randomize(pm, seed=3, std=1.0, adapter="first")
    randomize(pm, seed=4, std=1.0, adapter="second")
    skpeft.accelerate(pm)
    x = torch.randn(5, 10)
    outputs = {}
    for adapter in ("first", "second"):
        pm.set_adapter(adapter)
        with torch.inference_mode(where != "outside"):
            outputs[adapter] = pm(x)
    assert not torch.allclose(outputs["first"], outputs["second"], atol=1e-3, rtol=1e-3)
    saved = {n: p.detach().clone() for n, p in pm.state_dict().items() if "shira" in n}
    pm.save_pretrained(tmp_path / "shira")
    assert (tmp_path / "shira" / "first" / "adapter_config.json").is_file()
    assert (tmp_path / "shira" / "second" / "adapter_config.json").is_file()

    with torch.inference_mode(where == "load-inside"):
        loaded = PeftModel.from_pretrained(peft_mlp(), tmp_path / "shira" / "first",
                                           adapter_name="first")
        loaded.load_adapter(tmp_path / "shira" / "second", "second")
        skpeft.accelerate(loaded)
    state = loaded.state_dict()
    assert all(torch.equal(state[n], t) for n, t in saved.items())
    for adapter in ("first", "second"):
        # (PEFT's set_adapter sets requires_grad, which an inference tensor takes only inside)
        with torch.inference_mode(where == "load-inside"):
            loaded.set_adapter(adapter)
        with torch.inference_mode(where != "outside"):  # the loaded model's first forward
            assert torch.equal(bits(loaded(x)), bits(outputs[adapter]))
        # Outside inference_mode too (without autograd when the parameters are inference
        # tensors, which PEFT alone cannot record either).
        with torch.set_grad_enabled(where != "load-inside"):
            assert torch.equal(bits(loaded(x)), bits(outputs[adapter]))
    # Merge and unmerge under inference_mode restore the loaded base weights exactly.
    before = base_weights(loaded)
    with torch.inference_mode():
        loaded.merge_adapter()
        torch.testing.assert_close(loaded(x), outputs["second"], rtol=1e-5, atol=1e-5)
        loaded.unmerge_adapter()
    assert same_bits(base_weights(loaded), before)


# =============================================================================================
# adapter_names: a batch whose rows use different adapters (PEFT offers it for LoRA only)
# =============================================================================================
def two_adapter_model():
    pm = shira(tiny())
    pm.add_adapter("other", ShiraConfig(r=R, target_modules=["fc1", "fc2"], random_seed=9))
    randomize(pm, seed=7, adapter="other")
    return skpeft.accelerate(pm).eval()


def test_adapter_names_rows_match_their_adapter():
    pa = two_adapter_model()
    names = ["other", "__base__", "default", "other"]
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = pa(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with pa.disable_adapter():
                    ref = pa(x[i:i + 1])
            else:
                pa.set_adapter(name)
                ref = pa(x[i:i + 1])
            # fp32, sums of at most 24 terms: differences at the level of fp32 rounding.
            torch.testing.assert_close(mixed[i:i + 1], ref, rtol=1e-5, atol=1e-6)
        pa.set_adapter("default")
        # The hooks are gone after the call: a plain forward is the active adapter's again.
        torch.testing.assert_close(pa(x), pa(x, adapter_names=["default"] * 4))


def test_adapter_names_sees_values_written_since_the_last_call():
    # Without autograd each layer keeps the delta it hands the op (generate asks for it at
    # every step); a write to the adapter's values, in place or inside inference_mode, must
    # reach the next call.
    pa = two_adapter_model()
    with torch.no_grad():  # "other" in an unsorted order: its delta holds a gathered copy
        for module in pa.modules():
            if isinstance(module, PeftShiraLinear) and "other" in module.shira_weight:
                order = torch.randperm(module.shira_weight["other"].numel(),
                                       generator=torch.Generator().manual_seed(3))
                module.shira_indices["other"].copy_(module.shira_indices["other"][:, order])
                module.shira_weight["other"].copy_(module.shira_weight["other"][order])
    names = ["other", "default"]
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = pa(x, adapter_names=names)
    for inference in (False, True):
        with torch.inference_mode(inference):
            randomize(pa, seed=11 + inference, adapter="other")
        with torch.no_grad():
            after = pa(x, adapter_names=names)
            pa.set_adapter("other")
            want = pa(x[:1])
            pa.set_adapter("default")
        assert not torch.equal(after[:1], before[:1])
        torch.testing.assert_close(after[:1], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(after[1:], before[1:])
        before = after
    # With autograd on, the gradient of the values that require it (the active adapter's)
    # flows through the mixed forward.
    out = pa(x, adapter_names=names).square().sum()
    trained = [p for n, p in pa.named_parameters() if n.endswith("shira_weight.default")]
    assert trained and all(p.requires_grad for p in trained)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(out, trained))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adapter_names_under_autocast(dtype):
    # The layers' inputs after the first are in the autocast dtype while the weights stay fp32
    # (PEFT's own forward runs so): each row within the 16-bit bound of its adapter's network.
    pa = two_adapter_model()
    names = ["other", "__base__", "default"]
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        mixed = pa(x, adapter_names=names)
    assert mixed.dtype == dtype
    layers = [("fc1", True), ("fc2", True), ("blocks.0.0", False)]  # (name, ReLU after)
    modules = dict(pa.base_model.model.named_modules())
    for row, name in enumerate(names):
        exact, magnitude = x[row:row + 1].double(), x[row:row + 1].double().abs()
        for layer, relu in layers:
            m = modules[layer]
            w = m.get_base_layer().weight.double()
            if name in m.shira_weight:  # "other" is on fc1 and fc2 only
                w = w + m.get_delta_weight(name).to_dense().double()
            b = m.get_base_layer().bias
            exact = exact @ w.T + (0 if b is None else b.double())
            magnitude = magnitude @ w.abs().T + (0 if b is None else b.double().abs())
            if relu:
                exact = torch.relu(exact)
        # fp32 steps: each layer's products and sums, the bias and S's separate sum; 16-bit
        # roundings: x, each layer's W and S, the two hidden outputs.
        assert_within_error_bound(mixed[row:row + 1], exact, magnitude, 16 + 24 + 12 + 3 * 2,
                                  f"row {row} ({name})", roundings=1 + 3 * 2 + 2)


def test_adapter_names_leaves_the_model_copyable():
    # The layers keep the SparseDeltaSet of their last mixed call: the model must still
    # deepcopy and pickle (the set's lock cannot be; the copy makes its own).
    pa = two_adapter_model()
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mixed = pa(x, adapter_names=["other", "default"])
        for copied in (copy.deepcopy(pa), torch.load(_saved(pa), weights_only=False)):
            assert torch.equal(copied(x, adapter_names=["other", "default"]), mixed)


def _saved(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


def test_adapter_names_checks_as_peft_lora_does():
    pa = two_adapter_model()
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="non-existing adapter"):
        pa(x, adapter_names=["nope", "default"])
    with pytest.raises(ValueError, match="one name per batch row"):
        with torch.no_grad():
            pa(x, adapter_names=["default"] * 3)
    pa.train()
    with pytest.raises(ValueError, match="training mode"):
        pa(x, adapter_names=["default", "other"])
    skpeft.restore(pa)
    assert "_enable_peft_forward_hooks" not in pa.base_model.__dict__


def test_accelerated_model_compiles_with_no_more_graph_breaks_than_peft():
    pm = shira(tiny())
    pa = skpeft.accelerate(copy.deepcopy(pm))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    breaks = {}
    for name, model in (("peft", pm), ("accelerated", pa)):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(x)
        breaks[name] = (explanation.graph_break_count, explanation.break_reasons)
    assert breaks["accelerated"][0] <= breaks["peft"][0], breaks
    torch._dynamo.reset()
    compiled = torch.compile(pa, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), pa(x), rtol=1e-6, atol=1e-6)


def test_accelerated_tiny_llama_compiles_with_the_base_models_graph_breaks():
    # The case: a transformers Llama with SHiRA on every projection. PEFT's own layers
    # break the graph in every layer (sparse_coo_tensor); accelerated, the model breaks exactly
    # where the model without adapters does, and the compiled forward is the eager one.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    base = transformers.LlamaForCausalLM(config).eval()
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(copy.deepcopy(base), ShiraConfig(r=4, target_modules=projections)).eval()
    for layer in pm.modules():
        if isinstance(layer, PeftShiraLinear):  # nonzero adapters, so outputs differ from base's
            nn.init.normal_(layer.shira_weight["default"], std=0.1)
    pa = skpeft.accelerate(copy.deepcopy(pm))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    breaks = {}
    for name, model in (("base", base), ("peft", pm), ("accelerated", pa)):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(input_ids=ids)
        breaks[name] = explanation.graph_break_count
    assert breaks["accelerated"] == breaks["base"] < breaks["peft"], breaks
    torch._dynamo.reset()
    compiled = torch.compile(pa, backend="aot_eager")
    with torch.no_grad():
        eager = pa(input_ids=ids).logits
        assert not torch.equal(eager, base(input_ids=ids).logits)
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
