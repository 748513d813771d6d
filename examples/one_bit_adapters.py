"""1-bit LoRA adapters end to end: train two on a frozen model, pack them, serve both in one batch.

    python examples/one_bit_adapters.py [--quick] [--seed N]

A small frozen MLP and two related regression tasks (each the MLP with its weights perturbed
its own way). For each task a BinaryLoRALinear branch (r = 32) on both linears is trained with
the straight-through estimator (its weights fake-quantized to μ + α·sign on every forward), then
packed: the branch keeps only sign bits and fp32 α, μ. BinaryAdapterBank then serves a batch whose
rows use task 1, task 2 or the base, in one forward, each row through its own adapter.

Printed: each task's error before and after, the packed adapters' bytes against the same branch
in fp32, and how far each mixed row is from its own adapter's model. main(argv) returns the
numbers (tests/test_binary_bank.py runs the quick mode).
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

from shira_kernels import BinaryAdapterBank
from shira_kernels.nn import BinaryLoRALinear

IN, HIDDEN, OUT, R = 32, 64, 8, 32


def make_base(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def make_task(base: nn.Sequential, seed: int) -> nn.Sequential:
    """The base with every weight perturbed by a seed's own low-rank change: related tasks."""
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (teacher[0], teacher[2]):
            out_f, in_f = layer.weight.shape
            u, v = torch.randn(out_f, 2, generator=g), torch.randn(2, in_f, generator=g)
            layer.weight += 0.3 * (u @ v) / in_f ** 0.5
    return teacher.requires_grad_(False)


def adapted(base: nn.Sequential) -> nn.Sequential:
    """A copy of base with a 1-bit LoRA branch on both linears (the base frozen)."""
    model = copy.deepcopy(base)
    model[0] = BinaryLoRALinear.from_linear(model[0], R)
    model[2] = BinaryLoRALinear.from_linear(model[2], R)
    return model


def train(model: nn.Module, teacher: nn.Module, steps: int, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(64, IN, generator=g)
        loss = F.mse_loss(model(x), teacher(x))
        opt.zero_grad()
        loss.backward()
        opt.step()


def error(model: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return F.mse_loss(model(x), teacher(x)).item()


def branch_bytes(model: nn.Module, packed: bool) -> int:
    """Bytes of the model's 1-bit branches: their buffers once packed, else fp32 down and up."""
    total = 0
    for layer in (model[0], model[2]):
        lora = layer.lora
        tensors = ([lora.down_packed, lora.down_alpha, lora.down_mu, lora.up_packed,
                    lora.up_alpha, lora.up_mu] if packed else [lora.down, lora.up])
        total += sum(t.numel() * (t.element_size() if packed else 4) for t in tensors)
    return total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps (the test's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    steps = 150 if args.quick else 300
    base = make_base(args.seed).requires_grad_(False)
    x_test = torch.randn(512, IN, generator=torch.Generator().manual_seed(args.seed + 99))
    results, tuned = {}, {}
    for task in ("task1", "task2"):
        teacher = make_task(base, args.seed + (1 if task == "task1" else 2))
        model = adapted(base)
        before = error(base, teacher, x_test)
        train(model, teacher, steps, args.seed)
        float_bytes = branch_bytes(model, packed=False)
        for layer in (model[0], model[2]):
            layer.pack()
        after = error(model, teacher, x_test)
        packed_bytes = branch_bytes(model, packed=True)
        results[task] = {"error_base": before, "error_adapted": after,
                         "fp32_bytes": float_bytes, "packed_bytes": packed_bytes}
        tuned[task] = model
        print(f"{task}: mean squared error {before:.4f} (base) -> {after:.4f} (1-bit adapter, "
              f"packed); branch {float_bytes} B in fp32 -> {packed_bytes} B packed "
              f"({float_bytes / packed_bytes:.1f}x smaller)")

    # One batch, three kinds of rows: each through its own adapter, nothing written to the base.
    bank = BinaryAdapterBank(base)
    for task, model in tuned.items():
        bank.add_from_model(task, model)
    names = ["task1", "task2", None, "task2", "task1", None]
    x = torch.randn(len(names), 5, IN, generator=torch.Generator().manual_seed(args.seed + 7))
    with torch.no_grad(), bank.mixed(names):
        y = base(x)
    with torch.no_grad():
        own = {None: base(x), **{task: model(x) for task, model in tuned.items()}}
    gap = max((y[i] - own[n][i]).abs().max().item() for i, n in enumerate(names))
    results["mixed_max_gap"] = gap
    print(f"mixed batch {names}: each row within {gap:.2e} of its own adapter's model "
          f"(the base's rows: {'equal' if gap == 0 else 'see gap'})")
    return results


if __name__ == "__main__":
    main()
