"""Training under torch.distributed on the CPU (gloo, 2 processes): DDP and FSDP2 give the
adapter values and losses a single process gets on the same global batch (within the
reduction-order tolerance), only the adapters take gradients, and the frozen base gets none;
for ShiraLinear, and for BinaryLoRALinear and DyLoRALinear (whose rank draws come from the
layer's own seeded generator, the same on every rank)."""
import datetime
import inspect
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from shira_kernels.nn import BinaryLoRALinear, DyLoRALinear, ShiraLinear

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD, STEPS, BATCH = 2, 3, 8
# DDP's switch for syncing buffers each forward: forward_sync_buffers from torch 2.13 on
# (broadcast_buffers, its old name, warns there).
_SYNC_BUFFERS = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
    nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers")


def make_model(kind="shira", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 6))
    if kind == "shira":
        model[0] = ShiraLinear.from_linear(model[0], r=2, seed=1)
        model[2] = ShiraLinear.from_linear(model[2], r=2, seed=2)
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


def _worker(rank, wrap, kind, out_dir):
    torch.set_num_threads(1)
    # A file rendezvous (no port to race for); a rank that fails must not leave the other
    # waiting forever in a collective.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
                            rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        model = make_model(kind)
        if wrap.startswith("ddp"):  # the buffers broadcast each step (DDP's default) or not
            wrapped = nn.parallel.DistributedDataParallel(
                model, **{_SYNC_BUFFERS: wrap == "ddp"})
        else:
            from torch.distributed.fsdp import fully_shard
            for layer in (model[0], model[2]):
                fully_shard(layer)
            wrapped = fully_shard(model)
        losses = train(wrapped, batches(), rank, WORLD)
        state = adapter_state(model)
        base_grads = [p.grad for n, p in model.named_parameters() if not p.requires_grad]
        torch.save({"losses": losses, "state": state,
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
        pytest.importorskip("torch.distributed.fsdp")
        from torch.distributed import fsdp
        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
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
