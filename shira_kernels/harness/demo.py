"""`shira-kernels demo`: two SHiRA adapters, trained, switched, fused, saved and reloaded.

The story, in a few seconds on a CPU:
  1. a small MLP (the "base model") and two synthetic regression tasks, A and B: each asks
     for the base model's output plus its own change (a random linear map of the input);
  2. a SHiRA adapter per task: replace_linear puts a ShiraLinear on every layer, only the
     sparse ``shira_values`` are trained; the loss falls;
  3. both go into an AdapterBank on the base model; each task's loss with its own adapter
     active against the other's (own must be better), and how fast a switch is;
  4. the fusion of both (activate([A, B])) on the task that asks for both changes at once;
  5. bank.save of both, bank.load into a fresh bank on a freshly built base: the outputs equal
     the originals; deactivate() gives back the base weights bit for bit.
Returns 0 when every claim held, 1 (saying which did not) otherwise.
"""
from __future__ import annotations

import copy
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..adapters import AdapterBank
from ..nn.shira_linear import mark_only_adapters_trainable, replace_linear

IN_FEATURES, HIDDEN, OUT_FEATURES = 32, 128, 8
LAYERS = ("fc1", "fc2", "head")
TRAIN_SAMPLES, TEST_SAMPLES = 1024, 2048
R = 4  # SHiRA budget: r·(out+in) trained entries per layer
LEARNING_RATE = 0.02
TASKS = ("A", "B")


def build_base(seed: int) -> nn.Sequential:
    """The base model: three linear layers with GELU, seeded, frozen."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(IN_FEATURES, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, OUT_FEATURES)]
    layers = OrderedDict()
    for k, (name, (n_in, n_out)) in enumerate(zip(LAYERS, sizes)):
        linear = nn.Linear(n_in, n_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n_out, n_in, generator=gen) * n_in ** -0.5)
            linear.bias.copy_(torch.randn(n_out, generator=gen) * 0.1)
        layers[name] = linear
        if k < len(sizes) - 1:
            layers[f"act{k + 1}"] = nn.GELU()
    return nn.Sequential(layers).requires_grad_(False)


class Task:
    """Targets = base(x) + x·M, a task-specific change M of the base's behaviour."""

    def __init__(self, name: str, base: nn.Module, change: torch.Tensor, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.name = name
        self.change = change
        self.x_train = torch.randn(TRAIN_SAMPLES, IN_FEATURES, generator=gen)
        self.x_test = torch.randn(TEST_SAMPLES, IN_FEATURES, generator=gen)
        with torch.no_grad():
            self.y_train = base(self.x_train) + self.x_train @ change
            self.y_test = base(self.x_test) + self.x_test @ change

    @torch.no_grad()
    def loss(self, model: nn.Module) -> float:
        return float(nn.functional.mse_loss(model(self.x_test), self.y_test))


def _changes(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000)
    # Unit-variance outputs, so that each task's loss without its change is about 1.
    return {name: torch.randn(IN_FEATURES, OUT_FEATURES, generator=gen) * IN_FEATURES ** -0.5
            for name in TASKS}


def train_adapter(base: nn.Module, task: Task, steps: int, seed: int, say) -> nn.Module:
    """A copy of ``base`` with a ShiraLinear on every layer, only the adapters trained."""
    model = copy.deepcopy(base)
    replace_linear(model, list(LAYERS), r=R, seed=seed)
    trainable = mark_only_adapters_trainable(model)
    total = sum(p.numel() for p in base.parameters())
    say(f"  adapter {task.name}: {trainable:,} trainable values "
        f"({100 * trainable / total:.1f}% of the base's {total:,} parameters)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    every = max(1, steps // 4)
    for step in range(steps + 1):
        loss = nn.functional.mse_loss(model(task.x_train), task.y_train)
        if step % every == 0 or step == steps:
            say(f"    step {step:3d}  training loss {loss.item():.4f}")
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model


def _weights_bits(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone().view(torch.int32) for p in model.parameters()]


def _same_bits(model: nn.Module, bits: list[torch.Tensor]) -> bool:
    return all(torch.equal(p.detach().view(torch.int32), b)
               for p, b in zip(model.parameters(), bits))


def run(steps: int = 40, seed: int = 0, say=print) -> int:
    started = time.perf_counter()
    torch.manual_seed(seed)
    failures: list[str] = []

    def check(ok: bool, text: str) -> None:
        say(f"  [{'ok' if ok else 'FAILED'}] {text}")
        if not ok:
            failures.append(text)

    say("1. A base model and two tasks")
    base = build_base(seed)
    changes = _changes(seed)
    changes["A+B"] = changes["A"] + changes["B"]
    tasks = {name: Task(name, base, change, seed + 10 + k)
             for k, (name, change) in enumerate(changes.items())}
    say(f"  base: MLP {IN_FEATURES} -> {HIDDEN} -> {HIDDEN} -> {OUT_FEATURES} (layers "
        f"{', '.join(LAYERS)}); task T asks for base(x) + x·M_T, a different M for A and B; "
        "task A+B asks for both changes at once")

    say(f"\n2. Training a SHiRA adapter per task ({steps} steps, Adam, only shira_values)")
    trained = {name: train_adapter(base, tasks[name], steps, seed + 100 * (k + 1), say)
               for k, name in enumerate(TASKS)}

    say("\n3. Both adapters in one AdapterBank on the base model")
    bits = _weights_bits(base)
    bank = AdapterBank(base)
    for name in TASKS:
        bank.add_from_model(name, trained[name])
    say(f"  {bank!r}")
    x_probe = tasks["A"].x_test[:64]
    with torch.no_grad():
        base_out = base(x_probe)
    columns = ("A", "B", "A+B")
    losses: dict[str, dict[str, float]] = {}
    outputs: dict[str, torch.Tensor] = {}

    def evaluate(label: str) -> None:
        losses[label] = {c: tasks[c].loss(base) for c in columns}

    evaluate("none")
    for name in TASKS:
        bank.activate(name)
        evaluate(name)
        with torch.no_grad():
            outputs[name] = base(x_probe)
            own = trained[name](x_probe)
        say(f"  adapter {name} active in the base weights vs the trained ShiraLinear model: "
            f"max |difference| {float((outputs[name] - own).abs().max()):.2e}")
    bank.activate(["A", "B"])
    evaluate("fusion")
    with torch.no_grad():
        outputs["fusion"] = base(x_probe)
    bank.activate("A")
    switches = 200
    t0 = time.perf_counter()
    for k in range(switches):
        bank.activate(TASKS[(k + 1) % 2])
    per_switch = (time.perf_counter() - t0) / switches
    say(f"  a switch A <-> B takes {per_switch * 1e6:.0f} us (mean of {switches}; one batched "
        "scatter-swap over the three layers)")
    bank.deactivate()

    say("\n  test loss (mean squared error, held-out data):")
    say(f"  {'':24s}" + "".join(f"{'task ' + c:>12s}" for c in columns))
    rows = [("no adapter (base)", "none")] + [(f"adapter {n} active", n) for n in TASKS] \
        + [("fusion A+B active", "fusion")]
    for label, key in rows:
        say(f"  {label:24s}" + "".join(f"{losses[key][c]:12.4f}" for c in columns))
    for name, other in (("A", "B"), ("B", "A")):
        own, theirs = losses[name][name], losses[other][name]
        check(own < 0.5 * theirs,
              f"on task {name}, its own adapter ({own:.4f}) beats adapter {other} ({theirs:.4f})")
    both = losses["fusion"]["A+B"]
    best_single = min(losses[n]["A+B"] for n in TASKS)
    check(both < best_single,
          f"on task A+B, the fusion of both ({both:.4f}) beats either adapter alone "
          f"(best {best_single:.4f})")
    check(_same_bits(base, bits), "deactivate() restored every base weight bit for bit")

    say("\n4. Save both adapters, reload them into a fresh bank on a freshly built base")
    with tempfile.TemporaryDirectory(prefix="shira-demo-") as tmp:
        files = {}
        for name in TASKS:
            files[name] = Path(tmp) / f"adapter_{name}.safetensors"
            bank.save(name, files[name])
        sizes = ", ".join(f"{p.name} {p.stat().st_size:,} bytes" for p in files.values())
        say(f"  saved: {sizes}")
        fresh = build_base(seed)
        fresh_bits = _weights_bits(fresh)
        new_bank = AdapterBank(fresh)
        for name in TASKS:
            new_bank.load(name, files[name])
    for name in TASKS:
        new_bank.activate(name)
        with torch.no_grad():
            same = torch.equal(fresh(x_probe), outputs[name])
        check(same, f"reloaded adapter {name}: outputs equal the original bank's exactly")
    new_bank.activate(["A", "B"])
    with torch.no_grad():
        same = torch.equal(fresh(x_probe), outputs["fusion"])
    check(same, "reloaded fusion A+B: outputs equal the original's exactly")
    new_bank.deactivate()
    with torch.no_grad():
        restored = torch.equal(fresh(x_probe), base_out)
    check(_same_bits(fresh, fresh_bits) and restored,
          "deactivate() on the fresh bank: base weights bit for bit, base outputs exactly")

    say(f"\n{'all claims held' if not failures else f'{len(failures)} claim(s) FAILED'} "
        f"({time.perf_counter() - started:.1f} s)")
    return 0 if not failures else 1
