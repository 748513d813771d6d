"""transfer.distill_adapter (Trans-LoRA): argument checks, what it may and may not change, the
discriminator's filter, the adapter kinds (LoRA → SHiRA, SHiRA → 1-bit), and the example."""
from __future__ import annotations

import copy
import importlib.util
import pathlib
import types

import pytest
import torch
from torch import nn

from shira_kernels import transfer
from shira_kernels.nn import BinaryLoRALinear, ShiraLinear, replace_linear

VOCAB, LENGTH = 8, 6
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "trans_lora.py"


class TinyLM(nn.Module):
    """A causal toy LM: token embeddings averaged over the prefix, an MLP, a head. Called as
    model(ids) it returns logits [B, T, V]; with output_hidden_states=True an output object
    with .logits and .hidden_states."""

    def __init__(self, hidden: int, seed: int, vocab: int = VOCAB):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)
        self.lm_head = nn.Linear(hidden, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, ids, output_hidden_states=False):
        x = self.embed(ids)
        steps = torch.arange(1, ids.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        h = x.cumsum(1) / steps
        h = h + self.down(torch.relu(self.up(h)))
        logits = self.lm_head(h)
        if output_hidden_states:
            return types.SimpleNamespace(logits=logits, hidden_states=(x, h))
        return logits


def seeds(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB - 1, (n, LENGTH), generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(before: dict, model: nn.Module) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@torch.no_grad()
def mean_kl(source, target, ids: torch.Tensor) -> float:
    """KL(source ‖ target) of the next-token distributions, averaged over all positions."""
    log_p = torch.log_softmax(source(ids), -1)
    log_q = torch.log_softmax(target(ids), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def small(**overrides) -> dict:
    """Quick settings for the unit tests."""
    kw = dict(n_synthetic=16, steps=3, discriminator="tokens", discriminator_steps=20,
              batch_size=8, adapter_kwargs={"density": 0.25, "strategy": "spmm"})
    kw.update(overrides)
    return kw


# -- bad arguments: each refused with the argument's name, and nothing changed ----------------
def _bad_generate(seed_examples, n, rng):
    return torch.zeros(n + 1, LENGTH, dtype=torch.long)


BAD = [
    (dict(source_model=3), TypeError, "source_model"),
    (dict(target_model=lambda ids: ids), TypeError, "target_model"),
    (dict(seed_examples=torch.zeros(4, LENGTH)), ValueError, "seed_examples"),
    (dict(seed_examples=torch.zeros(LENGTH, dtype=torch.long)), ValueError, "seed_examples"),
    (dict(seed_examples=torch.zeros(1, LENGTH, dtype=torch.long)), ValueError, "seed_examples"),
    (dict(seed_examples=torch.full((4, LENGTH), VOCAB)), ValueError, "seed_examples"),
    (dict(adapter="lora"), ValueError, "adapter"),
    (dict(adapter_kwargs=[("density", 0.1)]), ValueError, "adapter_kwargs"),
    (dict(adapter="binary", adapter_kwargs={"density": 0.1}), ValueError, "adapter_kwargs"),
    (dict(adapter_kwargs={"density": 2.0}), ValueError, "density"),
    (dict(target_modules=["nothing_here"]), ValueError, "target_modules"),
    (dict(target_modules=3), ValueError, "target_modules"),
    # lm_head [8, 8] cannot hold r=5 (80 > 64 entries), up [16, 8] can: refused before any work
    (dict(target_modules=["up", "lm_head"], adapter_kwargs={"r": 5}), ValueError, "'lm_head'"),
    # a mask tensor fits up but not lm_head: up is wrapped first, then put back
    (dict(target_modules=["up", "lm_head"],
          adapter_kwargs={"mask": torch.ones(16, 8, dtype=torch.bool)}), ValueError, "'lm_head'"),
    (dict(adapter_kwargs={"strategy": "fast"}), ValueError, "strategy"),
    (dict(adapter="binary", adapter_kwargs={"r": 0}), ValueError, "r"),
    (dict(n_synthetic=0), ValueError, "n_synthetic"),
    (dict(n_synthetic=True), ValueError, "n_synthetic"),
    (dict(max_generated=4), ValueError, "max_generated"),
    (dict(prompt_tokens=LENGTH), ValueError, "prompt_tokens"),
    (dict(prompt_tokens=0), ValueError, "prompt_tokens"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(generate_fn="sample"), TypeError, "generate_fn"),
    (dict(generate_fn=_bad_generate), ValueError, "generate_fn"),
    (dict(generator=5), TypeError, "generator"),
    (dict(discriminator="bert"), ValueError, "discriminator"),
    (dict(discriminator_steps=0), ValueError, "discriminator_steps"),
    (dict(discriminator_synthetic=-1), ValueError, "discriminator_synthetic"),
    (dict(keep_threshold=1.5), ValueError, "keep_threshold"),
    (dict(steps=0), ValueError, "steps"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(positions="last"), ValueError, "positions"),
    (dict(positions=[LENGTH]), ValueError, "positions"),
    (dict(kl_temperature=-1.0), ValueError, "kl_temperature"),
    (dict(seed="0"), ValueError, "seed"),
    (dict(seed=2 ** 64), ValueError, "^seed must lie"),  # was: an overflow naming nothing
    # Layer i (up, down) gets seed + i: down's would not fit torch's Generator.
    (dict(seed=2 ** 64 - 1), ValueError, "^seed must lie .*last layer"),
    (dict(adapter_kwargs={"density": 0.25, "seed": -2 ** 63 - 1}), ValueError,
     r"^adapter_kwargs\['seed'\] must lie"),
]


@pytest.mark.parametrize("overrides, error, name", BAD,
                         ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_arguments_name_the_argument_and_change_nothing(overrides, error, name):
    source, target = TinyLM(12, 0), TinyLM(8, 1)
    before_source, before_target = snapshot(source), snapshot(target)
    call = dict(source_model=source, target_model=target, seed_examples=seeds())
    call.update(overrides)
    kwargs = small()
    kwargs.update({k: v for k, v in call.items()
                   if k not in ("source_model", "target_model", "seed_examples")})
    with pytest.raises(error, match=name):
        transfer.distill_adapter(call["source_model"], call["target_model"],
                                 call["seed_examples"], **kwargs)
    assert_same(before_source, source)
    assert_same(before_target, target)
    assert not any(isinstance(m, (ShiraLinear, BinaryLoRALinear)) for m in target.modules())
    assert all(p.requires_grad for p in target.parameters())
    assert target.training


def test_refuses_other_vocabulary_same_model_and_target_without_adapter():
    source = TinyLM(12, 0)
    with pytest.raises(ValueError, match="vocabulary"):
        transfer.distill_adapter(source, TinyLM(8, 1, vocab=VOCAB + 1), seeds(), **small())
    with pytest.raises(ValueError, match="same object"):
        transfer.distill_adapter(source, source, seeds(), **small())
    with pytest.raises(ValueError, match="adapter=None"):
        transfer.distill_adapter(source, TinyLM(8, 1), seeds(),
                                 **small(adapter=None, adapter_kwargs=None))
    with pytest.raises(ValueError, match="hidden_states"):  # a model without hidden states
        transfer.distill_adapter(source, TinyLM(8, 1), seeds(),
                                 **small(discriminator="hidden",
                                         generator=lambda ids: source(ids)))


# -- what changes: the adapter only ------------------------------------------------------------
def test_lora_to_shira_trains_only_the_adapter_and_leaves_both_bases_bit_for_bit():
    peft = pytest.importorskip("peft")
    source = peft.get_peft_model(TinyLM(12, 0), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["up", "down"], lora_dropout=0.0))
    with torch.no_grad():  # PEFT starts B at zero: give the source adapter an effect
        for name, p in source.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    target = TinyLM(8, 1)
    base = copy.deepcopy(target)
    before_source, before_target = snapshot(source), snapshot(target)
    rng_state = torch.random.get_rng_state()
    report = transfer.distill_adapter(source, target, seeds(),
                                      **small(discriminator="hidden", steps=40, lr=2e-2))
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # global RNG untouched
    assert_same(before_source, source)
    assert report.adapted_layers == ["up", "down"]  # lm_head is left out by default
    assert isinstance(target.up, ShiraLinear) and isinstance(target.down, ShiraLinear)
    after = target.state_dict()
    for key, value in before_target.items():  # every base tensor bit for bit
        assert torch.equal(after[key], value), key
    adapter = transfer.adapter_parameters(target)
    assert set(adapter) == {"up.shira_values", "down.shira_values"}
    assert all(bool((p != 0).any()) for p in adapter.values())
    assert report.trainable_parameters == sum(p.numel() for p in adapter.values())
    # The wrapped layers' bases are frozen, the adapter trainable, the rest as it was.
    assert not target.up.weight.requires_grad and not target.down.bias.requires_grad
    assert all(p.requires_grad for p in adapter.values())
    assert target.embed.weight.requires_grad and target.lm_head.weight.requires_grad
    assert len(report.losses) == 40 and all(loss >= 0 for loss in report.losses)
    # KL to the source falls to 0.35-0.43 of the base's (LoRA seeds 3-5, checked by hand).
    ids = report.kept_inputs
    assert mean_kl(source, target, ids) < 0.6 * mean_kl(source, base, ids)


def test_shira_to_binary_trains_the_one_bit_branch_only():
    source = TinyLM(12, 0)
    replace_linear(source, ["up", "down"], density=0.3, seed=0)
    with torch.no_grad():
        for p in transfer.adapter_parameters(source).values():
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    target = TinyLM(8, 1)
    base = copy.deepcopy(target)
    before_source, before_target = snapshot(source), snapshot(target)
    report = transfer.distill_adapter(source, target, seeds(), **small(
        adapter="binary", adapter_kwargs={"r": 2}, steps=40, lr=2e-2, discriminator=None))
    assert_same(before_source, source)
    assert isinstance(target.up, BinaryLoRALinear) and target.up.r == 2
    after = target.state_dict()
    for key, value in before_target.items():
        assert torch.equal(after[key], value), key
    adapter = transfer.adapter_parameters(target)
    assert set(adapter) == {"up.lora.down", "up.lora.up", "down.lora.down", "down.lora.up"}
    assert all(bool((target.get_submodule(n).lora.up != 0).any()) for n in ("up", "down"))
    # KL to the source falls to 0.27-0.38 of the base's (source seeds 4-6, checked by hand).
    ids = report.kept_inputs
    assert mean_kl(source, target, ids) < 0.6 * mean_kl(source, base, ids)


def test_shira_to_an_already_adapted_shira_target_is_trained_in_place():
    source, target = TinyLM(12, 0), TinyLM(8, 1)
    replace_linear(source, ["up"], density=0.3, seed=0)
    with torch.no_grad():
        source.up.shira_values.normal_(generator=torch.Generator().manual_seed(5))
    replace_linear(target, ["up"], density=0.5, seed=0)
    before_source, before = snapshot(source), snapshot(target)
    report = transfer.distill_adapter(source, target, seeds(),
                                      **small(adapter=None, adapter_kwargs=None))
    assert report.adapted_layers == []
    assert report.trainable_parameters == target.up.shira_values.numel()
    assert_same(before_source, source)
    after = target.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"up.shira_values"}


def test_a_failure_during_training_puts_the_target_back():
    source, target = TinyLM(12, 0), TinyLM(8, 1)
    calls = {"n": 0}

    def failing_source(ids, **kwargs):  # fine while sampling, fails on the 3rd training step
        if ids.shape[1] == LENGTH and ids.shape[0] == 8:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("source failed")
        return source(ids, **kwargs)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="source failed"):
        transfer.distill_adapter(failing_source, target, seeds(),
                                 **small(n_synthetic=24, steps=5, discriminator=None))
    assert calls["n"] == 3
    assert_same(before, target)
    assert not any(isinstance(m, ShiraLinear) for m in target.modules())
    assert all(p.requires_grad for p in target.parameters())


def test_same_seed_same_result():
    runs = []
    for _ in range(2):
        target = TinyLM(8, 1)
        report = transfer.distill_adapter(TinyLM(12, 0), target, seeds(), **small(steps=4))
        runs.append((report.losses, report.kept_inputs, snapshot(target)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])
    for key in runs[0][2]:
        assert torch.equal(runs[0][2][key], runs[1][2][key]), key


# -- the filter --------------------------------------------------------------------------------
GARBAGE = VOCAB - 1  # a token the seed examples never hold


def half_garbage(seed_examples, n, rng):
    """Even rows: a seed example with its tokens shuffled (real-like); odd rows: all GARBAGE."""
    rows = seed_examples[torch.randint(len(seed_examples), (n,), generator=rng)]
    shuffled = torch.stack([r[torch.randperm(len(r), generator=rng)] for r in rows])
    shuffled[1::2] = GARBAGE
    return shuffled


def test_filter_disabled_keeps_every_sample():
    report = transfer.distill_adapter(TinyLM(12, 0), TinyLM(8, 1), seeds(), **small(
        discriminator=None, generate_fn=half_garbage, n_synthetic=20))
    assert (report.generated, report.kept, report.rejected) == (20, 20, 0)
    assert report.discriminator_accuracy is None
    assert int((report.kept_inputs == GARBAGE).all(1).sum()) == 10


def test_filter_enabled_rejects_the_unlike_samples():
    report = transfer.distill_adapter(TinyLM(12, 0), TinyLM(8, 1), seeds(), **small(
        discriminator="tokens", generate_fn=half_garbage, n_synthetic=20,
        discriminator_steps=100))
    assert report.discriminator_accuracy == 1.0
    garbage_kept = int((report.kept_inputs == GARBAGE).all(1).sum())
    assert garbage_kept == 0 and report.kept >= 1
    # Half of what was drawn is garbage, all rejected; rounds go on until n_synthetic are kept
    # or max_generated (4·20) are drawn.
    assert report.rejected >= report.generated // 2
    assert report.kept == 20 or report.generated == 80
    assert report.generated == report.kept + report.rejected + report.surplus
    assert report.surplus >= 0


def test_keep_threshold_rule_and_all_rejected():
    # P(real) ≥ keep_threshold is kept: with a constant score of 0.5, 0.5 keeps all, 0.6 none.
    half = lambda ids: torch.full((ids.shape[0],), 0.5)  # noqa: E731
    report = transfer.distill_adapter(TinyLM(12, 0), TinyLM(8, 1), seeds(), **small(
        discriminator=half, keep_threshold=0.5))
    assert (report.kept, report.rejected, report.generated) == (16, 0, 16)
    target = TinyLM(8, 1)
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="rejected all 64"):
        transfer.distill_adapter(TinyLM(12, 0), target, seeds(), **small(
            discriminator=half, keep_threshold=0.6))  # max_generated defaults to 4·16
    assert_same(before, target)
    assert not any(isinstance(m, ShiraLinear) for m in target.modules())


def test_sampling_continues_the_seed_prefixes():
    s = seeds()
    out = transfer.sample_from_prompts(TinyLM(12, 0), s, 30, prompt_tokens=2,
                                       generator=torch.Generator().manual_seed(0))
    assert out.shape == (30, LENGTH)
    prefixes = {tuple(r) for r in s[:, :2].tolist()}
    assert all(tuple(r) in prefixes for r in out[:, :2].tolist())
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB
    for bad, name in ((dict(n=0), "n"), (dict(prompt_tokens=LENGTH), "prompt_tokens"),
                      (dict(temperature=0), "temperature"), (dict(generator=0), "generator"),
                      (dict(seed_examples=s.float()), "seed_examples")):
        kwargs = dict(seed_examples=s, n=4, prompt_tokens=2)
        kwargs.update(bad)
        with pytest.raises((ValueError, TypeError), match=name):
            transfer.sample_from_prompts(TinyLM(12, 0), **kwargs)


# -- the example -------------------------------------------------------------------------------
def test_example_quick_transfers():
    spec = importlib.util.spec_from_file_location("trans_lora_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    result = example.main(["--quick", "--seed", "0"])
    assert torch.get_num_threads() == threads
    # Seeds 0-3 (checked by hand): source ≥ 0.998, without adapter ≤ 0.06, after transfer
    # ≥ 0.948, seeds only 0.69-0.89; the margins asserted are well inside those seen.
    assert result["source_with_adapter"] >= 0.9
    assert result["target_without_adapter"] <= 0.3
    assert result["target_after_transfer"] >= result["target_without_adapter"] + 0.5
    assert result["target_after_transfer"] > result["target_seed_only"]
    assert result["verdict"] == "transferred"
    assert 0 < result["kept"] <= result["generated"]


def test_a_failure_while_training_the_targets_own_adapter_leaves_it_as_it_was():
    source, target = TinyLM(12, 0), TinyLM(8, 1)
    replace_linear(target, ["up"], density=0.5, seed=0)
    target.down.requires_grad_(False)  # a flag the call changes while it trains
    grad = torch.full_like(target.up.shira_values, 0.5)
    target.up.shira_values.grad = grad  # a gradient the caller had accumulated
    target.train()
    calls = {"n": 0}

    def failing_source(ids, **kwargs):  # fails on the 3rd training step, after 2 Adam steps
        if ids.shape == (8, LENGTH):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("source failed")
        return source(ids, **kwargs)
    flags = {name: p.requires_grad for name, p in target.named_parameters()}
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="source failed"):
        transfer.distill_adapter(failing_source, target, seeds(), adapter=None, n_synthetic=24,
                                 steps=5, batch_size=8, discriminator=None)
    assert calls["n"] == 3
    assert_same(before, target)
    assert {name: p.requires_grad for name, p in target.named_parameters()} == flags
    assert target.up.shira_values.grad is grad and torch.equal(grad, torch.full_like(grad, 0.5))
    assert all(p.grad is None for name, p in target.named_parameters() if "shira" not in name)
    assert target.training
