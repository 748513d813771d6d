"""Trans-LoRA on two tiny Llama models: a task LoRA moved to a smaller base as a SHiRA adapter,
with synthetic data only.

Everything is built here, nothing is downloaded. The vocabulary is the digits 0-9, BOS and SEP.
Both bases (LlamaForCausalLM from a config, random init, of different widths) are pre-trained
briefly on a corpus of "BOS d1..d9 SEP a" whose digits tend to recur and whose answer follows
another rule (corpus_batch), so they can generate the format but know nothing of the task. The task: the nine digits hold one
digit five times (a majority) and a is that digit. The source base gets a PEFT LoRA trained on
plenty of task data. Then transfer.distill_adapter moves it to the target base as a SHiRA
adapter, seeing only a few (--seeds) task examples: the source base continues prefixes of
them, a discriminator filters the samples, and the target's adapter learns to match the
source's next-token distributions on the kept ones.

Reported (accuracy of the answer at SEP, argmax over the digits, on held-out task examples):
source with its LoRA, target without adapter, target after transfer, and a SHiRA adapter on the
target trained on the seed examples alone (the reference that transfer should beat).

    python examples/trans_lora.py [--quick] [--seed N]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F

from shira_kernels import transfer
from shira_kernels.nn import replace_linear

DIGITS, BOS, SEP = 10, 10, 11
VOCAB = 12
LENGTH = 12  # BOS, 9 digits, SEP, answer
ANSWER_AT = LENGTH - 2  # the position whose next-token prediction is the answer
MAJORITY = 5
REPEAT = 0.5
LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def corpus_batch(n: int, gen: torch.Generator) -> torch.Tensor:
    """Pre-training text in the task's format. Digits tend to recur (as words do in text):
    each after the first repeats an earlier one with probability REPEAT, else it is uniform.
    The answer follows another rule, the successor of the first digit, so a base continues a
    prefix in the task's style but answers by the wrong rule."""
    digits = torch.randint(DIGITS, (n, 9), generator=gen)
    for i in range(1, 9):
        earlier = digits[torch.arange(n), torch.randint(i, (n,), generator=gen)]
        repeat = torch.rand(n, generator=gen) < REPEAT
        digits[:, i] = torch.where(repeat, earlier, digits[:, i])
    answer = (digits[:, :1] + 1) % DIGITS
    return torch.cat([torch.full((n, 1), BOS), digits, torch.full((n, 1), SEP), answer], 1)


def task_batch(n: int, gen: torch.Generator) -> torch.Tensor:
    """Task examples: one digit fills 5 of the 9 places (the others differ from it); the answer
    is that digit."""
    majority = torch.randint(DIGITS, (n, 1), generator=gen)
    others = (majority + 1 + torch.randint(DIGITS - 1, (n, 9), generator=gen)) % DIGITS
    places = torch.rand(n, 9, generator=gen).argsort(1)[:, :MAJORITY]
    digits = others.scatter(1, places, majority.expand(n, MAJORITY))
    return torch.cat([torch.full((n, 1), BOS), digits, torch.full((n, 1), SEP), majority], 1)


def make_llama(hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=LENGTH, bos_token_id=BOS, eos_token_id=SEP,
                         pad_token_id=SEP, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def train(model, params, steps: int, lr: float, batches, loss_at: int | None) -> None:
    """Adam on ``params``; next-token cross-entropy at every position, or only at loss_at."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        ids = batches()
        logits = logits_of(model, ids)[:, :-1]
        targets = ids[:, 1:]
        if loss_at is not None:
            logits, targets = logits[:, loss_at], targets[:, loss_at]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def accuracy(model, examples: torch.Tensor) -> float:
    predicted = logits_of(model, examples)[:, ANSWER_AT, :DIGITS].argmax(-1)
    return float((predicted == examples[:, -1]).float().mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller run (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=32, help="real task examples for transfer")
    parser.add_argument("--discriminator", choices=["hidden", "tokens", "none"],
                        default="hidden", help="the filter of the synthetic samples")
    parser.add_argument("--adapter", choices=["shira", "binary"], default="shira",
                        help="the target's adapter type (SHiRA or 1-bit LoRA)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    # These models are tiny: one thread is as fast, and far faster on a busy machine.
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    quick = args.quick
    pretrain_steps = 250 if quick else 600
    lora_steps = 200 if quick else 500
    distill_steps = 200 if quick else 600
    density = 0.1

    source = make_llama(64, 2, seed=1000 + args.seed)
    target = make_llama(32, 2, seed=2000 + args.seed)
    for base in (source, target):
        train(base, list(base.parameters()), pretrain_steps, 3e-3,
              lambda: corpus_batch(64, gen), loss_at=None)
        base.requires_grad_(False)

    # The source's task adapter: a PEFT LoRA trained on plenty of task data.
    from peft import LoraConfig, get_peft_model
    with torch.random.fork_rng(devices=[]):  # LoRA's A is drawn from the global RNG
        torch.manual_seed(3000 + args.seed)
        source = get_peft_model(source, LoraConfig(r=8, lora_alpha=16, target_modules=LAYERS,
                                                   lora_dropout=0.0))
    source.eval()
    train(source, [p for p in source.parameters() if p.requires_grad], lora_steps, 3e-3,
          lambda: task_batch(64, gen), loss_at=ANSWER_AT)

    seed_examples = task_batch(args.seeds, gen)
    test = task_batch(1000 if not quick else 500, gen)
    results = {"source_with_adapter": accuracy(source, test),
               "target_without_adapter": accuracy(target, test)}

    # The reference: a SHiRA adapter on the target trained on the seed examples alone.
    reference = copy.deepcopy(target)
    replace_linear(reference, LAYERS, density=density, seed=args.seed)
    for layer in reference.modules():
        if hasattr(layer, "shira_values"):
            layer.strategy = "spmm"
    train(reference, list(transfer.adapter_parameters(reference).values()), distill_steps,
          1e-2, lambda: seed_examples, loss_at=ANSWER_AT)
    results["target_seed_only"] = accuracy(reference, test)

    adapter_kwargs = ({"density": density, "strategy": "spmm"} if args.adapter == "shira"
                      else {"r": 4})
    report = transfer.distill_adapter(
        source, target, seed_examples, adapter=args.adapter, target_modules=LAYERS,
        adapter_kwargs=adapter_kwargs, n_synthetic=512 if quick else 2048, prompt_tokens=4,
        discriminator=None if args.discriminator == "none" else args.discriminator,
        steps=distill_steps, lr=1e-2, batch_size=64, seed=args.seed)
    results["target_after_transfer"] = accuracy(target, test)
    results.update(generated=report.generated, kept=report.kept, rejected=report.rejected,
                   discriminator_accuracy=report.discriminator_accuracy,
                   final_loss=sum(report.losses[-10:]) / len(report.losses[-10:]),
                   seconds=time.perf_counter() - started)

    judged = ("no filter" if report.discriminator_accuracy is None else
              f"discriminator's accuracy on its training samples "
              f"{report.discriminator_accuracy:.2f}")
    print(f"synthetic samples: {report.generated} drawn, {report.rejected} rejected, "
          f"{report.kept} kept ({judged}); final KL {results['final_loss']:.4f}")
    print(f"source with LoRA:           {results['source_with_adapter']:.3f}")
    print(f"target without adapter:     {results['target_without_adapter']:.3f}")
    print(f"target SHiRA, seeds only:   {results['target_seed_only']:.3f}  "
          f"({args.seeds} real examples)")
    print(f"target after transfer:      {results['target_after_transfer']:.3f}  "
          f"({args.adapter}, {report.trainable_parameters} adapter parameters)")
    gain = results["target_after_transfer"] - results["target_without_adapter"]
    results["verdict"] = "transferred" if gain >= 0.3 else "not transferred"
    print(f"verdict: {results['verdict']} (after transfer − without adapter = {gain:+.3f}; "
          f"{results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
