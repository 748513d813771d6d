"""What a refused call must leave as it was, compared bit for bit (the bad-input tests)."""
from __future__ import annotations

import torch
from torch import nn


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bits as integers (so that -0.0 and NaN payloads compare exactly);
    other tensors as they are. Detached, not copied."""
    t = t.detach()
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def state_bits(module: nn.Module, *, skip: tuple[str, ...] = (),
               derived: bool = False) -> dict[str, torch.Tensor]:
    """A copy of the bits of ``module``'s state_dict tensors (keys starting with a prefix in
    ``skip`` left out: quantized weights that compare otherwise), with ``derived`` its
    non-persistent buffers too (the structures derived from an adapter's indices)."""
    items = list(module.state_dict(keep_vars=True).items())
    if derived:
        items += [(name, b) for name, b in module.named_buffers() if b is not None]
    return {name: bits(t).clone() for name, t in items
            if isinstance(t, torch.Tensor) and not name.startswith(skip or ("\0",))}


def assert_same_bits(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t), f"{name} changed by a refused call"
