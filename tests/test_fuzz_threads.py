"""Threads against the package's promises: several threads on the same layer, bank, set or
weight. Each test forces the interleaving that used to break a promise (a hook pauses one
thread at the critical point, events and the weight lock's waiters say when the other got
there) and checks that the outcome is one of the sequential ones, bit for bit.

Where the fixed code makes the second thread wait, the test can only tell that it waits by
its not finishing within a short time; that costs the test the wait, never its verdict (a
slow machine can only make the unfixed code look right, never the fixed code look wrong).
"""
from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import shira_kernels.nn.dylora as dylora_module
import shira_kernels.nn.shira_linear as shira_linear_module
from shira_kernels import AdapterBank, SparseDelta
from shira_kernels._concurrency import weight_lock
from shira_kernels.formats import SparseDeltaSet
from shira_kernels.nn import ShiraLinear
from shira_kernels.nn.dylora import DyLoRALinear
from shira_kernels.ops.multi_delta import multi_delta_linear
from shira_kernels.ops.scatter_swap import adapted_entries

from unchanged import assert_same_bits, bits, state_bits

JOIN = 10.0      # seconds: a thread still alive after this is a deadlock
BLOCKED = 0.5    # seconds a thread that must wait is given to (wrongly) finish


def _until(predicate, timeout: float = JOIN) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def _waiting_on(weight: torch.Tensor) -> int:
    """How many threads wait in the weight's lock (CPython's Condition keeps them)."""
    return len(weight_lock(weight)._cond._waiters)


def _start(target) -> threading.Thread:
    errors = []

    def run():
        try:
            target()
        except BaseException as e:  # noqa: BLE001 - reported by _join
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.errors = errors
    t.start()
    return t


def _join(t: threading.Thread) -> None:
    t.join(JOIN)
    assert not t.is_alive(), "a thread never finished (deadlock)"
    if t.errors:
        raise t.errors[0]


def _delta(shape, nnz, seed) -> SparseDelta:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(shape[0] * shape[1], generator=g)[:nnz].sort().values
    return SparseDelta(shape, idx, torch.randn(nnz, generator=g))


def _shira_layer(out_f=32, in_f=24, seed=0) -> ShiraLinear:
    torch.manual_seed(seed)
    layer = ShiraLinear.from_linear(nn.Linear(in_f, out_f), r=2, seed=seed)
    with torch.no_grad():
        layer.shira_values.copy_(torch.randn(layer.shira_values.numel()))
    return layer


class _PauseAt(TorchFunctionMode):
    """In the thread that enters it: after (or before) the first call that ``match`` accepts,
    set ``reached`` and wait for ``resume``."""

    def __init__(self, match, after: bool = True):
        super().__init__()
        self.match, self.after = match, after
        self.reached, self.resume = threading.Event(), threading.Event()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        hit = not self.reached.is_set() and self.match(func, args)
        if hit and not self.after:
            self.reached.set()
            self.resume.wait(JOIN)
        out = func(*args, **(kwargs or {}))
        if hit and self.after:
            self.reached.set()
            self.resume.wait(JOIN)
        return out


# ---------------------------------------------------------------------------------------------
# SparseDeltaSet: remove + add in another thread while multi_delta_linear resolves names.
# ---------------------------------------------------------------------------------------------
def test_a_row_named_a_never_runs_with_the_adapter_that_took_as_slot():
    """multi_delta_linear used to map the names to slots, then read the slots again: a remove
    of "a" and an add of "b" in between (each thread-safe) ran a's rows with b's delta."""
    shape = (16, 8)
    da, db = _delta(shape, 20, 1), _delta(shape, 20, 2)
    weight = torch.randn(shape)
    x = torch.randn(3, shape[1])

    class Interleaved(SparseDeltaSet):
        # The other thread's remove + add lands the first time the set's slots are read.
        fired = False

        def snapshot(self):
            if not self.fired:
                self.fired = True
                _join(_start(lambda: (self.remove("a"), self.add("b", db))))
            return SparseDeltaSet.snapshot(self)

    live = Interleaved(shape)
    live.add("a", da)
    alone = SparseDeltaSet(shape)
    alone.add("a", da)
    want = multi_delta_linear(x, weight, None, alone, ["a", None, "a"])
    try:
        y = multi_delta_linear(x, weight, None, live, ["a", None, "a"])
    except KeyError as e:  # "a" was removed first: a legal sequential outcome
        assert "'a'" in str(e)
    else:
        assert torch.equal(bits(y), bits(want)), "rows named 'a' ran with another adapter"
    assert live.fired and live.names == ["b"] and live.index("b") == 0


def test_slots_given_as_a_tensor_still_work_and_unknown_names_raise():
    shape = (16, 8)
    s = SparseDeltaSet(shape)
    s.add("a", _delta(shape, 10, 1))
    s.add("b", _delta(shape, 10, 2))
    weight, x = torch.randn(shape), torch.randn(2, shape[1])
    by_name = multi_delta_linear(x, weight, None, s, ["b", "__base__"])
    by_slot = multi_delta_linear(x, weight, None, s, torch.tensor([1, -1]))
    assert torch.equal(bits(by_name), bits(by_slot))
    with pytest.raises(KeyError, match="'c'"):
        multi_delta_linear(x, weight, None, s, ["a", "c"])


def test_multi_delta_linear_while_another_thread_removes_and_re_adds():
    """Every batch named ["a", None] runs a's delta, or raises KeyError when "a" is out at
    that moment, whatever the other thread does: "a" and "b" take turns in slot 0."""
    shape = (24, 16)
    da, db = _delta(shape, 40, 1), _delta(shape, 40, 2)
    weight, x = torch.randn(shape), torch.randn(2, shape[1])
    s = SparseDeltaSet(shape)
    s.add("a", da)
    want = bits(multi_delta_linear(x, weight, None, s, ["a", None])).clone()
    go, stop = threading.Barrier(2), threading.Event()

    def churn():
        go.wait(JOIN)
        while not stop.is_set():
            s.remove("a")
            s.add("b", db)
            s.remove("b")
            s.add("a", da)

    t = _start(churn)
    go.wait(JOIN)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for _ in range(100):
            try:
                y = multi_delta_linear(x, weight, None, s, ["a", None])
            except KeyError as e:
                assert "'a'" in str(e)
                continue
            assert torch.equal(bits(y), want), "rows named 'a' ran with another adapter"
    finally:
        sys.setswitchinterval(old)
        stop.set()
        _join(t)
    assert s.names == ["a"] and s.index("a") == 0


# ---------------------------------------------------------------------------------------------
# DyLoRALinear: set_rank / merge from two threads.
# ---------------------------------------------------------------------------------------------
def test_two_set_rank_calls_leave_one_consistent_rank(monkeypatch):
    """set_rank(2) paused after writing the buffers, set_rank(5) in another thread: the layer
    used to end with rank 2 but the mask and scale of rank 5."""
    layer = DyLoRALinear(8, 8, r=6, seed=0).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    write = layer._write_rank
    main = threading.get_ident()
    other = []

    def paused_write(mask, scale, b):
        write(mask, scale, b)
        if threading.get_ident() == main and not other:
            done = threading.Event()
            other.append(_start(lambda: (layer.set_rank(5), done.set())))
            done.wait(BLOCKED)  # the fixed set_rank(5) waits for this one to finish

    monkeypatch.setattr(layer, "_write_rank", paused_write)
    layer.set_rank(2)
    _join(other[0])
    b = layer.rank
    assert b in (2, 5)
    assert torch.equal(layer.rank_mask, (torch.arange(6) < b).float())
    assert torch.equal(layer.rank_scale, torch.tensor(layer.alpha / b, dtype=torch.float32))
    x = torch.randn(4, 8)
    fresh = DyLoRALinear(8, 8, r=6, seed=0).eval()
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(bits(layer(x)), bits(fresh.set_rank(b)(x)))


def test_a_forward_during_set_rank_runs_one_rank(monkeypatch):
    """set_rank(2) paused between writing rank_mask and rank_scale, a forward in another
    thread: it used to run rank 2's mask with rank 6's scale."""
    layer = DyLoRALinear(8, 8, r=6, seed=0).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 8)
    with torch.no_grad():
        legal = [bits(layer.set_rank(b)(x)).clone() for b in (2, 6)]
    reached, resume = threading.Event(), threading.Event()

    def paused_write(mask, scale, b):
        mask.zero_()
        mask[:b] = 1
        reached.set()
        resume.wait(JOIN)
        scale.fill_(layer.alpha / b)

    monkeypatch.setattr(layer, "_write_rank", paused_write)
    setter = _start(lambda: layer.set_rank(2))
    assert reached.wait(JOIN)
    out, done = [], threading.Event()

    def forward():
        with torch.no_grad():
            out.append(bits(layer(x)))
        done.set()
    forwarder = _start(forward)
    done.wait(BLOCKED)  # the fixed forward waits for set_rank
    resume.set()
    _join(setter)
    _join(forwarder)
    assert any(torch.equal(out[0], want) for want in legal)


def test_two_merges_of_a_dylora_layer_keep_the_base(monkeypatch):
    """merge() paused after computing W + ΔW, a merge() in another thread: the first used to
    back up the already merged weight as "the base", so unmerge() never restored it."""
    layer = DyLoRALinear(8, 8, r=4, seed=0).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    base = state_bits(layer)
    check = dylora_module.check_representable
    main = threading.get_ident()
    other = []

    def paused_check(*args, **kwargs):
        check(*args, **kwargs)
        if threading.get_ident() == main and not other:
            done = threading.Event()
            other.append(_start(lambda: (layer.merge(), done.set())))
            done.wait(BLOCKED)

    monkeypatch.setattr(dylora_module, "check_representable", paused_check)
    layer.merge()
    _join(other[0])
    assert layer.merged and layer.merged_rank == 4
    layer.unmerge()
    assert_same_bits(state_bits(layer), base)


def test_set_rank_and_merge_from_many_threads_end_consistent():
    layer = DyLoRALinear(12, 10, r=5, seed=1).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    base = bits(layer.weight).clone()
    go = threading.Barrier(3)

    def ranks(k):
        def run():
            go.wait(JOIN)
            for i in range(200):
                layer.set_rank(1 + (i + k) % 5) if not layer.merged else None
        return run

    def merges():
        go.wait(JOIN)
        for _ in range(100):
            try:
                layer.merge()
            except RuntimeError:  # merged at another rank by then: refused, nothing changed
                pass
            layer.unmerge()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [_start(ranks(0)), _start(ranks(2)), _start(merges)]
        for t in threads:
            t.join(JOIN)
    finally:
        sys.setswitchinterval(old)
    for t in threads:
        assert not t.is_alive()
        # set_rank refuses a rank other than the merged one while merged: a legal refusal.
        assert all(isinstance(e, RuntimeError) and "merged" in str(e) for e in t.errors)
    layer.unmerge()
    assert torch.equal(bits(layer.weight), base)
    b = layer.rank
    assert torch.equal(layer.rank_mask, (torch.arange(5) < b).float())
    assert torch.equal(layer.rank_scale, torch.tensor(layer.alpha / b, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# ShiraLinear: merge from two threads; hotswap_ while forwards run.
# ---------------------------------------------------------------------------------------------
def test_two_merges_of_a_shira_layer_keep_the_base(monkeypatch):
    """merge() paused before its swap, a merge() in another thread: both swapped, and the
    first held the adapted entries aside as "the base"; unmerge() then lost the base."""
    layer = _shira_layer()
    base = state_bits(layer)
    x = torch.randn(5, 24)
    with torch.no_grad():
        unfused = layer(x)
    merge = shira_linear_module.merge_by_swap
    main = threading.get_ident()
    other = []

    def paused_merge(*args, **kwargs):
        if threading.get_ident() == main and not other:
            done = threading.Event()
            other.append(_start(lambda: (layer.merge(), done.set())))
            done.wait(BLOCKED)
        return merge(*args, **kwargs)

    monkeypatch.setattr(shira_linear_module, "merge_by_swap", paused_merge)
    layer.merge()
    _join(other[0])
    monkeypatch.undo()
    assert layer.merged
    merged_once = layer.weight.detach().clone()
    layer.unmerge()
    assert_same_bits(state_bits(layer), base)
    layer.merge()  # the same merged weight as one merge gives
    assert torch.equal(bits(layer.weight), bits(merged_once))
    layer.unmerge()
    with torch.no_grad():
        assert torch.equal(bits(layer(x)), bits(unfused))


def test_merge_and_unmerge_from_many_threads_restore_the_base():
    layer = _shira_layer(seed=3)
    base = state_bits(layer)
    go = threading.Barrier(3)

    def flip(first):
        def run():
            go.wait(JOIN)
            for _ in range(150):
                (layer.merge if first else layer.unmerge)()
                (layer.unmerge if first else layer.merge)()
        return run

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [_start(flip(True)), _start(flip(False)), _start(flip(True))]
        for t in threads:
            _join(t)
    finally:
        sys.setswitchinterval(old)
    layer.unmerge()
    assert_same_bits(state_bits(layer), base)


@pytest.mark.parametrize("strategy", ["spmm", "fold"])
def test_a_forward_during_hotswap_keeps_the_layers_buffers(strategy):
    """hotswap_ paused between writing the indices and the structure (holding the weight's
    lock), a forward in another thread: the forward used to find the indices changed, derive
    the structure itself and put new buffers in place of the ones hotswap_ then wrote into,
    so a forward holding the old buffers ran the old structure with the new values (a wrong
    output), and a compiled model would lose its graph."""
    layer = _shira_layer()
    layer.strategy = strategy
    cap = layer.shira_values.numel()
    new = _delta(tuple(layer.weight.shape), cap, 7)
    x = torch.randn(4, 24)
    want_layer = _shira_layer()
    want_layer.strategy = strategy
    want_layer.hotswap_(new)
    with torch.no_grad():
        want = bits(want_layer(x)).clone()
    buffers = dict(layer.named_buffers())
    indices = layer.shira_flat_indices
    pause = _PauseAt(lambda func, args: func is torch.Tensor.copy_ and args[0] is indices)

    def swap():
        with pause:
            layer.hotswap_(new)

    swapper = _start(swap)
    assert pause.reached.wait(JOIN)  # the indices are written, the structure not yet
    out = []

    def forward():
        with torch.no_grad():
            out.append(layer(x))

    forwarder = _start(forward)
    # The forward waits for the weight's lock (the fixed one before looking at the structure,
    # the old one after deriving its own); then hotswap_ goes on.
    assert _until(lambda: _waiting_on(layer.weight) > 0 or not forwarder.is_alive())
    pause.resume.set()
    _join(swapper)
    _join(forwarder)
    assert all(b is buffers[name] for name, b in layer.named_buffers()), \
        "a forward replaced the layer's buffers during hotswap_"
    assert_same_bits(state_bits(layer, derived=True), state_bits(want_layer, derived=True))
    assert torch.equal(bits(out[0]), want)


@pytest.mark.parametrize("strategy", ["spmm", "fold", "swap"])
def test_forwards_while_another_thread_hotswaps_are_each_one_adapters(strategy):
    layer = _shira_layer(seed=5)
    layer.strategy = strategy
    cap = layer.shira_values.numel()
    deltas = [_delta(tuple(layer.weight.shape), cap, s) for s in (11, 12)]
    x = torch.randn(3, 24)
    legal = []
    with torch.no_grad():
        for d in deltas:
            layer.hotswap_(d)
            legal.append(bits(layer(x)).clone())
    weight = bits(layer.weight).clone()
    go, stop = threading.Barrier(3), threading.Event()
    wrong = []

    def swapper():
        go.wait(JOIN)
        for i in range(300):
            layer.hotswap_(deltas[i % 2])
        stop.set()

    def forwarder():
        go.wait(JOIN)
        with torch.no_grad():
            while not stop.is_set():
                y = bits(layer(x))
                if not any(torch.equal(y, want) for want in legal):
                    wrong.append(y)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [_start(swapper), _start(forwarder), _start(forwarder)]
        for t in threads:
            _join(t)
    finally:
        sys.setswitchinterval(old)
    assert not wrong, f"{len(wrong)} outputs were neither adapter's"
    assert torch.equal(bits(layer.weight), weight)


# ---------------------------------------------------------------------------------------------
# AdapterBank: the base entries read while a "swap" call has the weight's entries changed.
# ---------------------------------------------------------------------------------------------
def test_bank_add_during_a_swap_forward_prepares_from_the_base():
    """A ShiraLinear of the bank's model runs the "swap" strategy in another thread (W + S in
    its entries for the call): AdapterBank.add used to read those as the base entries."""
    model = nn.Sequential(_shira_layer())
    layer = model[0]
    layer.strategy = "swap"
    base = bits(layer.weight).clone()
    bank = AdapterBank(model)
    pause = _PauseAt(lambda func, args: func is F.linear, after=False)

    def forward():
        with torch.no_grad(), pause:
            layer(torch.randn(2, 24))

    forwarder = _start(forward)
    assert pause.reached.wait(JOIN)  # inside the swap: W holds W + S at the layer's entries
    idx = layer.shira_flat_indices.clone()
    delta = SparseDelta(tuple(layer.weight.shape), idx, torch.randn(idx.numel()))
    added = threading.Event()
    adder = _start(lambda: (bank.add("x", {"0": delta}), added.set()))
    assert _until(lambda: added.is_set() or _waiting_on(layer.weight) > 0)
    pause.resume.set()
    _join(forwarder)
    _join(adder)
    assert torch.equal(bits(layer.weight), base)
    want = adapted_entries(layer.weight.detach().view(-1)[idx.long()], delta.values, 1.0)
    assert torch.equal(bits(bank.prepared("x")["0"][1]), bits(want))
    bank.activate("x")
    assert torch.equal(bits(layer.weight.detach().view(-1)[idx.long()]), bits(want))
    bank.deactivate()
    assert torch.equal(bits(layer.weight), base)


def test_shira_merge_during_a_swap_forward_merges_the_base():
    """merge() while a "swap" forward of the same layer runs in another thread (W + S in the
    layer's entries for the call): merge_by_swap used to read those as the base entries, and
    the merged weight held W + 2S."""
    layer = _shira_layer()
    layer.strategy = "swap"
    base = bits(layer.weight).clone()
    idx = layer.shira_flat_indices.long()
    want = adapted_entries(layer.weight.detach().view(-1)[idx], layer.shira_values.detach(),
                           layer.scale)
    pause = _PauseAt(lambda func, args: func is F.linear, after=False)

    def forward():
        with torch.no_grad(), pause:
            layer(torch.randn(2, 24))

    forwarder = _start(forward)
    assert pause.reached.wait(JOIN)  # inside the swap
    merged = threading.Event()
    merger = _start(lambda: (layer.merge(), merged.set()))
    assert _until(lambda: merged.is_set() or _waiting_on(layer.weight) > 0)
    pause.resume.set()
    _join(forwarder)
    _join(merger)
    assert layer.merged
    assert torch.equal(bits(layer.weight.detach().view(-1)[idx]), bits(want))
    layer.unmerge()
    assert torch.equal(bits(layer.weight), base)


def test_scatter_swap_waits_for_another_swap_of_its_values():
    """Two swaps through one values tensor into different weights: the values are written too,
    so the second waits for the first (the values' lock), and each weight gets whole values."""
    from shira_kernels import scatter_swap_
    from shira_kernels._concurrency import writing
    w1, w2 = torch.zeros(64), torch.zeros(64)
    idx = torch.arange(0, 64, 4)
    values = torch.arange(1.0, 17.0)
    done = threading.Event()
    with writing(values):  # as a swap of `values` in progress would
        swapper = _start(lambda: (scatter_swap_([w2], [idx], [values]), done.set()))
        assert _until(lambda: done.is_set() or _waiting_on(values) > 0)
        assert not done.is_set()
    _join(swapper)
    assert torch.equal(w2[idx], torch.arange(1.0, 17.0)) and not values.any()
    assert not w1.any()


def test_a_weights_exclusive_holder_may_take_its_lock_again():
    """The thread holding a weight's lock exclusively takes it again in either mode without
    waiting on itself; another thread gets it only once every such hold is released."""
    w = torch.zeros(8)
    lock = weight_lock(w)
    lock.acquire_exclusive()
    lock.acquire_exclusive()
    lock.acquire_shared()
    got = threading.Event()

    def other():
        lock.acquire_shared()
        got.set()
        lock.release_shared()
    t = _start(other)
    for release in (lock.release_shared, lock.release_exclusive):
        release()
        assert not got.wait(0.05)  # still held
    lock.release_exclusive()
    _join(t)
    assert got.is_set()


def test_a_waiting_exclusive_holder_goes_before_new_shared_ones():
    """Readers hold a weight's lock: an exclusive taker waits for them, a reader arriving
    after it waits for it (a stream of forwards cannot starve a switch), and each gets the lock
    once the one before lets go."""
    from shira_kernels._concurrency import SharedExclusiveLock
    lock = SharedExclusiveLock()
    lock.acquire_shared()
    lock.acquire_shared()  # two readers
    order = []
    writer = _start(lambda: (lock.acquire_exclusive(), order.append("writer"),
                             lock.release_exclusive()))
    assert _until(lambda: len(lock._cond._waiters) == 1)
    reader = _start(lambda: (lock.acquire_shared(), order.append("reader"),
                             lock.release_shared()))
    assert _until(lambda: len(lock._cond._waiters) == 2)
    lock.release_shared()
    assert not order  # one reader still holds it
    lock.release_shared()
    _join(writer)
    _join(reader)
    assert order == ["writer", "reader"]


def test_an_interrupted_exclusive_waiter_lets_the_readers_behind_it_in(monkeypatch):
    """An exclusive taker whose wait is interrupted (KeyboardInterrupt on the main thread) no
    longer holds back the readers that queued behind it."""
    from shira_kernels._concurrency import SharedExclusiveLock
    lock = SharedExclusiveLock()
    lock.acquire_shared()
    interrupted = threading.Event()

    class Interrupting(threading.Condition):
        def wait(self, timeout=None):
            if threading.current_thread() is writer:  # as Condition.wait: the lock let go
                lock._mutex.release()                  # meanwhile, held again on raising
                interrupted.wait(JOIN)
                lock._mutex.acquire()
                raise KeyboardInterrupt
            return super().wait(timeout)
    lock._cond = Interrupting(lock._mutex)
    errors = []

    def take_exclusive():
        try:
            lock.acquire_exclusive()
        except KeyboardInterrupt:
            errors.append("interrupted")
    writer = threading.Thread(target=take_exclusive, daemon=True)
    writer.start()
    assert _until(lambda: lock._waiting == 1)
    got = threading.Event()
    reader = _start(lambda: (lock.acquire_shared(), got.set(), lock.release_shared()))
    assert not got.wait(BLOCKED)  # queued behind the waiting writer
    interrupted.set()
    writer.join(JOIN)
    _join(reader)
    assert errors == ["interrupted"] and got.is_set()
    lock.release_shared()
    lock.acquire_exclusive()  # free again
    lock.release_exclusive()


def test_mixed_blocks_guarded_forwards_and_switches_from_many_threads():
    """mixed() blocks, switches (adapters and a fusion), guarded forwards and add/remove in
    five threads: every output is a sequential one, nothing deadlocks, the base is intact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    base = [bits(p).clone() for p in model.parameters()]
    bank = AdapterBank(model)
    shapes = {"0": (24, 16), "2": (8, 24)}
    for k, name in enumerate("abc"):
        bank.add(name, {layer: _delta(shape, 30, 10 * k + i)
                        for i, (layer, shape) in enumerate(shapes.items())})
    x = torch.randn(4, 16)
    targets = [None, "a", "b", "c", ("a", "b")]
    rows = ["a", None, "b", "c"]
    legal = []
    with torch.no_grad():
        for target in targets:
            bank.activate(list(target) if isinstance(target, tuple) else target)
            legal.append(bits(model(x)).clone())
        bank.deactivate()
        with bank.mixed(rows):
            mixed_want = bits(model(x)).clone()
    guard = bank.guard_forward()
    go, stop = threading.Barrier(5), threading.Event()
    wrong = []

    def switcher():
        go.wait(JOIN)
        for i in range(120):
            target = targets[i % len(targets)]
            bank.activate(list(target) if isinstance(target, tuple) else target)
        stop.set()

    def mixer():
        go.wait(JOIN)
        with torch.no_grad():
            while not stop.is_set():
                with bank.lock:  # no switch between the deactivate and the block
                    bank.deactivate()
                    with bank.mixed(rows):
                        y = bits(model(x))
                if not torch.equal(y, mixed_want):
                    wrong.append("mixed")

    def forwarder():
        go.wait(JOIN)
        with torch.no_grad():
            while not stop.is_set():
                y = bits(model(x))
                if not any(torch.equal(y, want) for want in legal):
                    wrong.append("guarded")

    def churn():
        go.wait(JOIN)
        i = 0
        while not stop.is_set():
            bank.add(f"t{i}", {"0": _delta(shapes["0"], 30, 100 + i)})
            bank.remove(f"t{i}")
            i += 1

    threads = [_start(f) for f in (switcher, mixer, forwarder, forwarder, churn)]
    try:
        for t in threads:
            _join(t)
    finally:
        stop.set()
        guard.remove()
    assert not wrong, wrong[:5]
    bank.deactivate()
    assert all(torch.equal(bits(p), b) for p, b in zip(model.parameters(), base))
    assert all("forward" not in m.__dict__ for m in model)
