"""The one way to find a kernel: (op name, backend) → the function that runs that op there.

Every kernel of an op takes the op's reference signature (the ``*_reference`` function of its
family's file, the specification), so a caller looks one up and calls it whatever the backend:

  kernel(op, device, order=None)  the kernel of the backend backends.select(device, order)
                                  chooses (use_backend / SHIRA_KERNELS_BACKEND, else the
                                  device's automatic order): a dict hit per call
  lookup(op, backend)             the kernel of a named backend

Kernels are registered by each op family's file (sparse_delta/parts.py, binary.py,
scatter_swap.py), in one block per backend:

  register(op, backend, fn)       a kernel that exists at import (the references, adapters)
  register_lazy(op, backend, load)
                                  ``load()`` returns the kernel on first use: the native
                                  extensions are compiled, and triton imported, only when their
                                  backend runs
  register_module(backend, load_module, *ops)
                                  ops whose kernels are the same-named functions of a module
                                  (a compiled extension, a triton/ file) loaded on first use

A backend's binding that needs more than a name (a cached operand, a different packing of the
arguments) is registered as a small adapter in that backend's block; composed kernels (spmm
plus sddmm where no fused kernel exists) are registered per backend the same way. Adding an
op is its reference plus one registration line per backend; adding a backend is its kernel
file plus its block of registration lines (and its availability rule in backends.py).
"""
from __future__ import annotations

import threading
from typing import Callable

from .. import backends

_kernels: dict[tuple[str, str], Callable] = {}
_loaders: dict[tuple[str, str], Callable[[], Callable]] = {}
_lock = threading.Lock()


def _check_backend(backend: str) -> None:
    if backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; add it to backends.BACKENDS first")


def register(op: str, backend: str, fn: Callable | None = None):
    """Register ``fn`` as ``op``'s kernel on ``backend`` (usable as a decorator without fn)."""
    _check_backend(backend)

    def add(fn: Callable) -> Callable:
        with _lock:
            _loaders.pop((op, backend), None)
            _kernels[op, backend] = fn
        return fn
    return add if fn is None else add(fn)


def register_lazy(op: str, backend: str, load: Callable[[], Callable]) -> None:
    """Register ``load``, called once on the first lookup, as the maker of ``op``'s kernel on
    ``backend``."""
    _check_backend(backend)
    with _lock:
        _kernels.pop((op, backend), None)
        _loaders[op, backend] = load


def register_module(backend: str, load_module: Callable[[], object], *ops: str) -> None:
    """Register, for each of ``ops``, the function of that name in the module ``load_module()``
    returns (called on first use)."""
    for op in ops:
        register_lazy(op, backend, lambda op=op: getattr(load_module(), op))


def lookup(op: str, backend: str) -> Callable:
    """``op``'s kernel on ``backend``, loading it on first use."""
    fn = _kernels.get((op, backend))
    if fn is not None:
        return fn
    with _lock:
        load = _loaders.get((op, backend))
    if load is None:
        if (op, backend) in _kernels:
            return _kernels[op, backend]
        raise NotImplementedError(f"no {backend} kernel is registered for {op!r}")
    fn = load()  # outside the lock: a loader may look up other kernels (composites)
    with _lock:
        if _loaders.get((op, backend)) is load:  # not re-registered meanwhile
            del _loaders[op, backend]
            _kernels[op, backend] = fn
    return fn


def kernel(op: str, device, order=None) -> Callable:
    """``op``'s kernel on the backend that runs tensors on ``device`` (backends.select, with
    ``order`` replacing the device's automatic order where an op measured one)."""
    backend = backends.select(device) if order is None else backends.select(device, order)
    fn = _kernels.get((op, backend))
    return fn if fn is not None else lookup(op, backend)


def registered() -> dict[str, list[str]]:
    """{op: [backends with a kernel for it]}, for listing and tests."""
    with _lock:
        pairs = set(_kernels) | set(_loaders)
    table: dict[str, list[str]] = {}
    for op, backend in sorted(pairs):
        table.setdefault(op, []).append(backend)
    return table
