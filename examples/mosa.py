"""MoSA on a small synthetic task: does splitting an adapter into sparse modules, trained a
random subset at a time and merged afterwards, beat the same adapter trained whole?

    python examples/mosa.py [--quick] [--seed N] [--no-rescale]

A small residual MLP classifier is pre-trained here on task A (labels of a random teacher
network), then frozen and adapted with few examples to task B (a perturbed teacher: related,
not the same). Each adapter is trained with the same optimizer, steps and data:

    dense bottleneck       AdaptFormer's bottleneck beside the MLP, every entry every step
    MoSA bottleneck        the same bottleneck (same initial weights), k = 4 modules, 2 active
    MoSA hierarchical      2 groups x 2 modules, both groups and 1 module in each active
    ShiraLinear            a sparse delta on both MLP linears, every entry every step
    MoSA ShiraLinear       the same delta split into k = 4 modules, 2 active

Every MoSA adapter is merged at the end (merge_mosa) and evaluated merged: same trainable
parameter count and same inference cost as its baseline. The last lines print the accuracies
and the verdict. main(argv) returns the numbers (tests/test_mosa.py runs the quick mode).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from shira_kernels.methods.mosa import (Bottleneck, MoSABottleneck, MoSAShiraLinear,
                                        ParallelAdapter, merge_mosa)
from shira_kernels.nn import ShiraLinear

IN, WIDTH, HIDDEN, CLASSES = 16, 64, 128, 8
R = 8             # the bottleneck's rank: 2·R·WIDTH trainable weights (+ biases)
SHIRA_R = 4       # the sparse delta's budget: SHIRA_R·(in + out) entries per MLP linear


class Net(nn.Module):
    """embed → h + MLP(LayerNorm(h)) → LayerNorm → head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(IN, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH))
        self.out_norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.mlp(self.norm(h))
        return self.head(self.out_norm(h))


def teacher(generator):
    """A random 2-layer tanh network: its weights and its argmax labels."""
    w1 = torch.randn(HIDDEN, IN, generator=generator) / IN ** 0.5
    w2 = torch.randn(CLASSES, HIDDEN, generator=generator) / HIDDEN ** 0.5
    return w1, w2, lambda x: (torch.tanh(x @ w1.T) @ w2.T).argmax(-1)


def data(n, label, generator):
    x = torch.randn(n, IN, generator=generator)
    return x, label(x)


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train(model, params, x, y, steps, lr, generator, batch=64, weight_decay=0.01):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, x.shape[0], (batch,), generator=generator)
        loss = F.cross_entropy(model(x[pick]), y[pick])
        opt.zero_grad()  # set_to_none: an inactive MoSA module keeps grad None, AdamW skips it
        loss.backward()
        opt.step()


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def frozen_copy(base):
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run(seed: int, quick: bool, rescale: bool = True) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    pre_steps, steps = (300, 150) if quick else (1500, 600)
    n_few = 256  # task B's training set: few examples, where the paper says MoSA helps most

    # Task A, and task B: the same teacher with its first layer perturbed.
    w1, w2, label_a = teacher(g)
    w1_b = w1 + 0.7 * torch.randn(w1.shape, generator=g) / IN ** 0.5
    label_b = lambda x: (torch.tanh(x @ w1_b.T) @ w2.T).argmax(-1)  # noqa: E731
    xa, ya = data(8192, label_a, g)
    xa_test, ya_test = data(4096, label_a, g)
    xb, yb = data(n_few, label_b, g)
    xb_test, yb_test = data(4096, label_b, g)

    base = Net()
    train(base, base.parameters(), xa, ya, pre_steps, 3e-3, g, batch=128, weight_decay=0.0)
    result = {"seed": seed, "quick": quick, "task_a": accuracy(base, xa_test, ya_test),
              "base_on_b": accuracy(base, xb_test, yb_test), "chance": 1 / CLASSES,
              "accuracy": {}, "trainable": {}, "merged_equal": {}}

    def adapt(name, make, lr):
        model = frozen_copy(base)
        make(model)
        result["trainable"][name] = trainable(model)
        train(model, [p for p in model.parameters() if p.requires_grad], xb, yb, steps, lr,
              torch.Generator().manual_seed(seed + 7))
        before = accuracy(model, xb_test, yb_test)  # eval mode: every module
        merge_mosa(model)                            # no-op for the plain adapters
        result["accuracy"][name] = accuracy(model, xb_test, yb_test)
        result["merged_equal"][name] = abs(before - result["accuracy"][name]) < 1e-9

    adapter = Bottleneck(WIDTH, R, scale=1.0)  # one initialisation for all bottlenecks
    beside = lambda a: lambda m: setattr(m, "mlp", ParallelAdapter(m.mlp, a))  # noqa: E731
    adapt("dense bottleneck", beside(copy.deepcopy(adapter)), 3e-3)
    adapt("MoSA bottleneck", beside(MoSABottleneck.from_bottleneck(
        adapter, k=4, active=2, rescale=rescale, seed=seed)), 3e-3)
    adapt("MoSA hierarchical", beside(MoSABottleneck.from_bottleneck(
        adapter, k=2, active=2, hierarchical=True, k_fine=2, active_fine=1, rescale=rescale,
        seed=seed)), 3e-3)

    def shira(split: bool):
        def make(model):
            for i in (0, 2):
                layer = ShiraLinear.from_linear(model.mlp[i], r=SHIRA_R, seed=seed + i)
                model.mlp[i] = (MoSAShiraLinear.from_shira(layer, k=4, active=2, rescale=rescale,
                                                           seed=seed)
                                if split else layer)
        return make
    adapt("ShiraLinear", shira(False), 3e-3)
    adapt("MoSA ShiraLinear", shira(True), 3e-3)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (the test's mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-rescale", action="store_true",
                        help="MoSA's active entries not scaled by modules/active in training")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    try:
        result = run(args.seed, args.quick, rescale=not args.no_rescale)
    finally:
        torch.set_num_threads(threads)
    acc = result["accuracy"]
    print(f"seed {args.seed}{' (quick)' if args.quick else ''}: task A accuracy "
          f"{result['task_a']:.3f}; the pre-trained model on task B {result['base_on_b']:.3f} "
          f"(chance {result['chance']:.3f})")
    for name, value in acc.items():
        print(f"  {name:<18} task B accuracy {value:.3f}  ({result['trainable'][name]} trainable; "
              f"merged = unmerged: {result['merged_equal'][name]})")
    gain = acc["MoSA bottleneck"] - acc["dense bottleneck"]
    shira_gain = acc["MoSA ShiraLinear"] - acc["ShiraLinear"]
    result["mosa_minus_dense"], result["mosa_minus_shira"] = gain, shira_gain
    print(f"time {time.perf_counter() - start:.1f} s")
    print(f"verdict: MoSA bottleneck {'beats' if gain > 0 else 'does not beat'} the same-budget "
          f"dense bottleneck ({100 * gain:+.1f} points); MoSA ShiraLinear "
          f"{'beats' if shira_gain > 0 else 'does not beat'} the plain ShiraLinear "
          f"({100 * shira_gain:+.1f} points)")
    return result


if __name__ == "__main__":
    main()
