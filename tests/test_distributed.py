"""torch.distributed on the CPU (gloo, 2 processes).

Training: DDP and FSDP2 give the adapter values and losses a single process gets on the same
global batch (within the reduction-order tolerance), only the adapters take gradients, and the
frozen base gets none; for ShiraLinear, and for BinaryLoRALinear and DyLoRALinear (whose rank
draws come from the layer's own seeded generator, the same on every rank).

AdapterBank on an FSDP2-sharded model: every switch leaves the full weights (gathered here, by
the test only) bit for bit as a single-process bank leaves them, with no collective.

Checkpoints: torch.distributed.checkpoint restores a ShiraLinear model's state (base, adapter
values and int index buffers) bit for bit, under FSDP2, DDP and in one process."""
import datetime
import inspect
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from shira_kernels import AdapterBank, SparseDelta
from shira_kernels.nn import BinaryLoRALinear, DyLoRALinear, ShiraLinear

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD, STEPS, BATCH = 2, 3, 8
# DDP's switch for syncing buffers each forward: forward_sync_buffers from torch 2.13 on
# (broadcast_buffers, its old name, warns there).
_SYNC_BUFFERS = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
    nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers")


def make_model(kind="shira", seed=0, mask_seed=1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 6))
    if kind == "shira":
        model[0] = ShiraLinear.from_linear(model[0], r=2, seed=mask_seed)
        model[2] = ShiraLinear.from_linear(model[2], r=2, seed=mask_seed + 1)
        with torch.no_grad():  # non-zero adapters, so the steps move the loss
            for layer in (model[0], model[2]):
                layer.shira_values.copy_(torch.randn(layer.shira_values.shape) * 0.1)
    else:
        model[0] = BinaryLoRALinear.from_linear(model[0], r=4)
        model[2] = DyLoRALinear.from_linear(model[2], r=4, seed=3)
    return model


def batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(BATCH, 20, generator=g), torch.randn(BATCH, 6, generator=g))
            for _ in range(STEPS)]


def train(model, data, rank=0, world=1):
    """SGD steps on this rank's share of each global batch; the losses of the global batch."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for x, y in data:
        share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = (model(x[share]) - y[share]).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if world > 1:  # the global batch's loss: the mean of the ranks' equal shares
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def adapter_state(model):
    """The trainable tensors by name (full tensors: FSDP2 holds shards)."""
    out = {}
    for name, t in model.named_parameters():
        if t.requires_grad:
            t = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[name] = t.detach().clone()
    return out


def _init(rank, out_dir):
    torch.set_num_threads(1)
    # A file rendezvous (no port to race for); a rank that fails must not leave the other
    # waiting forever in a collective.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
                            rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))


def _wrap(model, wrap):
    """DDP (buffers broadcast each forward, DDP's default, or not) or FSDP2 (each layer with
    parameters, then the root)."""
    if wrap.startswith("ddp"):
        return nn.parallel.DistributedDataParallel(model, **{_SYNC_BUFFERS: wrap == "ddp"})
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    return fully_shard(model)


def _needs_fsdp2():
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")


def _worker(rank, wrap, kind, out_dir):
    _init(rank, out_dir)
    try:
        model = make_model(kind)
        wrapped = _wrap(model, wrap)
        reduced = []  # DDP: the elements of every gradient bucket it all-reduces
        if wrap.startswith("ddp"):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting(state, bucket):
                reduced.append(bucket.buffer().numel())
                return allreduce_hook(state, bucket)
            wrapped.register_comm_hook(None, counting)
        losses = train(wrapped, batches(), rank, WORLD)
        state = adapter_state(model)
        base_grads = [p.grad for n, p in model.named_parameters() if not p.requires_grad]
        torch.save({"losses": losses, "state": state, "reduced": reduced,
                    "base_grads": [g is None for g in base_grads]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Straight out: under pytest a second spawned pair sometimes hung in the interpreter's exit
    # handlers after its results were written (not in the training itself).
    os._exit(0)


@pytest.mark.parametrize("kind", ["shira", "binary+dylora"])
@pytest.mark.parametrize("wrap", ["ddp", "ddp-no-buffer-broadcast", "fsdp2"])
def test_distributed_training_matches_one_process(wrap, kind, tmp_path):
    if wrap == "fsdp2":
        _needs_fsdp2()
    single = make_model(kind)
    single_losses = train(single, batches())
    expected = adapter_state(single)
    mp.spawn(_worker, args=(wrap, kind, str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # fp32 sums over 20-32 features and a batch of 8, reduced in another order.
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single_losses),
                                   rtol=1e-5, atol=1e-6)
        assert got["state"].keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(got["state"][name].cpu(), value, rtol=1e-5, atol=1e-6)
        assert all(got["base_grads"])  # the frozen base never got a gradient
        if wrap.startswith("ddp"):  # and DDP all-reduces the adapters' gradients, nothing more
            adapter_numel = sum(v.numel() for v in expected.values())
            assert sum(got["reduced"]) == STEPS * adapter_numel, (got["reduced"], adapter_numel)


# -- AdapterBank on an FSDP2-sharded model ------------------------------------------------------
# Output sizes 16 (8 rows per rank), 7 (4 + 3: not divisible by the world size) and 1 (rank 1
# holds no row of it).
BANK_LAYERS = ("0", "2", "4")
# (label, what activate() gets, fusion weights): adapter, direct switch, fusion, fusion → adapter,
# base.
BANK_STEPS = (("a", "a", None), ("a->b", "b", None), ("fusion", ["a", "b"], [1.0, -0.5]),
              ("fusion->a", "a", None), ("base", None, None))


def make_bank_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 7), nn.ReLU(),
                         nn.Linear(7, 1))


def bank_adapters():
    """Two adapters as full-size SparseDeltas, the same on every rank: "a" on every layer, "b"
    on the first two (random masks, so they overlap on part of their entries; per-layer
    scales)."""
    g = torch.Generator().manual_seed(11)

    def delta(shape, density):
        numel = shape[0] * shape[1]
        flat = torch.randperm(numel, generator=g)[:max(1, int(density * numel))]
        return SparseDelta.from_flat(flat, shape, torch.randn(flat.numel(), generator=g))
    shapes = {name: tuple(make_bank_model()[int(name)].weight.shape) for name in BANK_LAYERS}
    a = {name: delta(shape, 0.3) for name, shape in shapes.items()}
    b = {"0": (delta(shapes["0"], 0.4), 0.5), "2": delta(shapes["2"], 0.5)}
    return a, b


def bank_input():
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(3))


def _full(t):
    """The whole tensor, detached (a DTensor gathered: the test's check, a collective)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def bank_steps(bank, model, run=lambda label, fn: fn()):
    """BANK_STEPS on ``bank``; after each, the full weights and the model's output. ``run``
    wraps each switch (the distributed test counts its collectives)."""
    x, snapshots = bank_input(), []
    for label, target, weights in BANK_STEPS:
        run(label, lambda: bank.activate(target, weights) if target is not None
            else bank.deactivate())
        assert bank.active == (tuple(target) if isinstance(target, list) else target)
        state = {name: _full(model.get_submodule(name).weight).clone() for name in BANK_LAYERS}
        with torch.no_grad():
            output = model(x)
        snapshots.append((label, state, output))
    return snapshots


def _bank_worker(rank, out_dir):
    _init(rank, out_dir)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.debug import CommDebugMode

        comms = {}

        def counted(label, fn):
            mode = CommDebugMode()
            with mode:
                fn()
            comms[label] = mode.get_total_counts()

        a, b = bank_adapters()
        model = _wrap(make_bank_model(), "fsdp2")
        assert all(hasattr(model.get_submodule(n).weight, "to_local") for n in BANK_LAYERS)
        bank = AdapterBank(model)
        counted("add a", lambda: bank.add("a", a, scale=2.0))
        counted("add b", lambda: bank.add("b", b))
        snapshots = bank_steps(bank, model, counted)
        # The counter's control: a forward all-gathers the sharded weights.
        counted("forward", lambda: model(bank_input()))
        given = {name: (d.flat_indices, d.values, scale)
                 for name, (d, scale) in bank.deltas("a").items()}
        prepared = {name: bank.prepared(name) for name in ("a", "b")}
        # Saving and loading are collective (the base entries' checksum); the file of either
        # rank loads into a single-process bank (checked by the test).
        path = os.path.join(out_dir, f"a_rank{rank}.safetensors")
        bank.save("a", path)
        bank.load("a loaded", path)
        loaded = bank.prepared("a loaded")
        # The root alone sharded: a forward without backward leaves its weights gathered; the
        # switch must still reach the next forward.
        root_only = make_bank_model()
        fully_shard(root_only)
        bank2 = AdapterBank(root_only)
        bank2.add("a", a, scale=2.0)
        with torch.no_grad():
            root_only(bank_input())
        bank2.activate("a")
        with torch.no_grad():
            root_only_output = root_only(bank_input())
        # add_from_model on a sharded ShiraLinear model gathers the adapter values (collective).
        shira = make_model()
        shira_bank = AdapterBank(_wrap(shira, "fsdp2"))
        shira_bank.add_from_model("trained", shira)
        shira_deltas = {name: (d.flat_indices, d.values, scale)
                        for name, (d, scale) in shira_bank.deltas("trained").items()}
        # Refused, naming the layer: mixed batches on a sharded layer, and weights sharded
        # other than by rows.
        errors = []
        bank2.deactivate()
        try:
            with bank2.mixed(["a"]):
                pass
        except TypeError as e:
            errors.append(str(e))
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        by_columns = nn.Sequential(nn.Linear(4, 6))
        by_columns[0].weight = nn.Parameter(distribute_tensor(
            by_columns[0].weight.detach(), init_device_mesh("cpu", (WORLD,)), [Shard(1)]))
        try:
            AdapterBank(by_columns)
        except ValueError as e:
            errors.append(str(e))
        torch.save({"snapshots": snapshots, "comms": comms, "given": given,
                    "prepared": prepared,
                    "loaded": loaded, "root_only": root_only_output, "errors": errors,
                    "from_model": shira_deltas},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)


def _bits(t):
    t = t.detach().contiguous()
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}.get(t.dtype, t.dtype))


def assert_same_bits(got, expected, what):
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    assert torch.equal(_bits(got), _bits(expected)), what


def test_adapter_bank_on_fsdp2_switches_shards_exactly_without_collectives(tmp_path):
    _needs_fsdp2()
    a, b = bank_adapters()
    for layer, item in b.items():  # a → b runs over the union on the layers both touch
        b_delta = item[0] if isinstance(item, tuple) else item
        shared = set(a[layer].flat_indices.tolist()) & set(b_delta.flat_indices.tolist())
        assert shared and len(shared) < a[layer].flat_indices.numel()
    single_model = make_bank_model()
    base = {name: single_model.get_submodule(name).weight.detach().clone()
            for name in BANK_LAYERS}
    single = AdapterBank(single_model)
    single.add("a", a, scale=2.0)
    single.add("b", b)
    expected = bank_steps(single, single_model)
    # The sequence really switches: every step's weights differ from the previous one's.
    for (_, before, _), (label, after, _) in zip(expected, expected[1:]):
        assert any(not torch.equal(before[n], after[n]) for n in BANK_LAYERS), label
    mp.spawn(_bank_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for (label, weights, output), (_, want, want_output) in zip(got["snapshots"], expected):
            for name in BANK_LAYERS:
                assert_same_bits(weights[name], want[name], f"rank {rank}, {label}, layer {name}")
            assert_same_bits(output, want_output, f"rank {rank}, {label}: output")
        assert_same_bits(got["snapshots"][-1][1]["0"], base["0"], "the base came back")
        # No collective in adding or switching; the counter sees the forward's all-gathers.
        assert got["comms"].pop("forward") > 0
        assert got["comms"] == {label: 0 for label in ["add a", "add b"]
                                + [step[0] for step in BANK_STEPS]}, got["comms"]
        for name, (delta, scale) in single.deltas("a").items():
            got_indices, got_values, got_scale = got["given"][name]
            assert got_scale == scale
            assert torch.equal(got_indices, delta.flat_indices)
            assert_same_bits(got_values, delta.values, f"deltas('a')[{name}]")
        # Loaded back from its own file: the same prepared values.
        for name, (indices, values) in got["prepared"]["a"].items():
            assert torch.equal(got["loaded"][name][0], indices)
            assert_same_bits(got["loaded"][name][1], values, f"rank {rank}: loaded, {name}")
        assert_same_bits(got["root_only"], expected[0][2], f"rank {rank}: root-only FSDP2")
        from_model = AdapterBank(make_model())
        from_model.add_from_model("trained", make_model())
        assert got["from_model"].keys() == {"0", "2"}
        for name, (delta, scale) in from_model.deltas("trained").items():
            got_indices, got_values, got_scale = got["from_model"][name]
            assert got_scale == scale and torch.equal(got_indices, delta.flat_indices)
            assert_same_bits(got_values, delta.values, f"rank {rank}: add_from_model, {name}")
        mixed_error, placement_error = got["errors"]
        assert "layer '0'" in mixed_error and "sharded" in mixed_error
        assert "layer '0'" in placement_error and "Shard(dim=1)" in placement_error
    # Each rank's prepared values are its rows' entries: together, the single bank's.
    for name in ("a", "b"):
        parts = [torch.load(tmp_path / f"rank{r}.pt")["prepared"][name] for r in range(WORLD)]
        for layer, (indices, values) in single.prepared(name).items():
            assert torch.equal(torch.cat([p[layer][0] for p in parts]), indices)
            assert_same_bits(torch.cat([p[layer][1] for p in parts]), values,
                             f"prepared({name!r})[{layer}]")
    # A sharded bank's file carries the full base checksum: one process loads it.
    for rank in range(WORLD):
        single.load(f"a from rank {rank}", tmp_path / f"a_rank{rank}.safetensors")
        for layer, (indices, values) in single.prepared("a").items():
            other = single.prepared(f"a from rank {rank}")[layer]
            assert torch.equal(other[0], indices)
            assert_same_bits(other[1], values, f"file of rank {rank}, {layer}")


# -- torch.distributed.checkpoint ---------------------------------------------------------------
def _restored_state(model, module):
    """The whole state_dict of ``module`` (FSDP2's DTensors gathered) and the output of
    ``model`` (the wrapped one) on a fixed input."""
    state = {key: _full(t).clone() for key, t in module.state_dict().items()}
    with torch.no_grad():
        output = model(batches()[0][0])
    return state, output


def _dcp_save_and_restore(wrap, checkpoint):
    """Save make_model()'s state with DCP, restore it into a model of other base, values and
    masks; returns (whether the fresh masks differed, the restored state, its output)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         set_model_state_dict)
    model = make_model()
    wrapped = _wrap(model, wrap) if wrap != "single" else model
    dcp.save(get_model_state_dict(wrapped), checkpoint_id=checkpoint)
    fresh = make_model(seed=5, mask_seed=7)
    with torch.no_grad():
        for layer in (fresh[0], fresh[2]):
            layer.shira_values.normal_()
    differed = not torch.equal(fresh[0].shira_flat_indices, model[0].shira_flat_indices)
    fresh_wrapped = _wrap(fresh, wrap) if wrap != "single" else fresh
    state = get_model_state_dict(fresh_wrapped)
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(fresh_wrapped, state)
    return (differed,) + _restored_state(fresh_wrapped, fresh)


def _dcp_worker(rank, wrap, out_dir):
    _init(rank, out_dir)
    try:
        result = _dcp_save_and_restore(wrap, os.path.join(out_dir, "checkpoint"))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)


def assert_restored(state, output, what):
    """``state`` and ``output`` are make_model()'s, bit for bit; its index buffers too (int)."""
    model = make_model()
    expected = model.state_dict()
    assert state.keys() == expected.keys(), what
    for key, value in expected.items():
        assert_same_bits(state[key], value, f"{what}: {key}")
    for layer in ("0", "2"):
        assert not state[f"{layer}.shira_flat_indices"].is_floating_point()
    with torch.no_grad():  # the layers' structure follows the restored indices
        torch.testing.assert_close(output, model(batches()[0][0]), rtol=1e-6, atol=1e-6)


# DCP warns that it runs in one process when no process group is initialized (as meant here).
_ONE_PROCESS_DCP = "ignore:torch.distributed is disabled:UserWarning"


@pytest.mark.filterwarnings(_ONE_PROCESS_DCP)
@pytest.mark.parametrize("wrap", ["fsdp2", "ddp"])
def test_distributed_checkpoint_restores_adapters_and_base_exactly(wrap, tmp_path):
    if wrap == "fsdp2":
        _needs_fsdp2()
    pytest.importorskip("torch.distributed.checkpoint.state_dict")
    mp.spawn(_dcp_worker, args=(wrap, str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        differed, state, output = torch.load(tmp_path / f"rank{rank}.pt")
        assert differed  # the fresh model had other masks: the indices were restored
        assert_restored(state, output, f"{wrap}, rank {rank}")
    # The 2-rank checkpoint loads into one unsharded process too.
    import torch.distributed.checkpoint as dcp
    fresh = make_model(seed=5, mask_seed=7)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "checkpoint"))
    fresh.load_state_dict(state)
    assert_restored(*_restored_state(fresh, fresh), f"{wrap} checkpoint in one process")


@pytest.mark.filterwarnings(_ONE_PROCESS_DCP)
def test_distributed_checkpoint_in_one_process(tmp_path):
    pytest.importorskip("torch.distributed.checkpoint.state_dict")
    differed, state, output = _dcp_save_and_restore("single", str(tmp_path / "checkpoint"))
    assert differed
    assert_restored(state, output, "one process")
