"""Which implementation of an op runs for a device.

Four backends exist: ``reference`` (pure torch, the specification, always there), ``cpu`` (C++
kernels, compiled on first use), ``triton`` (Triton kernels; on CPU tensors only under
TRITON_INTERPRET=1, which is how the tests run them without a GPU) and ``cuda`` (CUDA kernels,
compiled on first use where torch has CUDA).

An explicit choice, ``use_backend(name)`` or the environment variable SHIRA_KERNELS_BACKEND,
must be available or the call raises, naming what is missing. Without one, the first available
backend in the device's preference order runs, and a skipped backend is logged once with why.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os

import torch

from . import _machine, _native, tuning

log = logging.getLogger("shira_kernels")

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "SHIRA_KERNELS_BACKEND"

# Automatic order per device type. Triton on CPU tensors is the interpreter: correct but slow,
# so it is never chosen automatically.
_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
# The order for an op whose Triton kernel measured faster than its CUDA one (select's `order`;
# a row of the tuning table).
TRITON_FIRST = tuning.view("triton_first")

_explicit: contextvars.ContextVar[str | None] = contextvars.ContextVar("shira_backend", default=None)
_logged: set[tuple[str, str]] = set()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def _check_environment() -> None:
    """Run at import: an unknown name in SHIRA_KERNELS_BACKEND fails here, listing the valid
    ones, not at the first op call (which may come much later, e.g. after a model has loaded).
    Unset, empty (or blank) and "auto" mean the automatic choice. requested() checks again at
    each call, for a variable set after import."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "auto" and env not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={env!r}: unknown backend {env!r}; choose one of "
                         f"{', '.join(BACKENDS)}, or auto (or leave it unset) for the "
                         f"automatic choice")


_check_environment()


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the ops inside the ``with`` block on backend ``name`` (None: automatic choice)."""
    token = _explicit.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _explicit.reset(token)


def requested() -> str | None:
    """The explicit choice in force: use_backend's, else SHIRA_KERNELS_BACKEND's, else None."""
    name = _explicit.get()
    if name is None:
        env = _machine.environment(ENV_VAR).strip()
        if env and env != "auto":
            name = _check_name(env)
    return name


@functools.cache
def _triton_installed() -> bool:  # asked on every op call: find_spec is not free
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(name: str, device_type: str) -> str | None:
    """None when backend ``name`` can run ops on tensors of ``device_type``, else why not."""
    _check_name(name)
    if name == "reference":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs CPU tensors only, not {device_type}"
        return _native.unavailable_reason("cpu")
    if name == "triton":
        if not _triton_installed():
            return "triton is not installed (pip install triton)"
        if device_type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
            return None
        if device_type != "cuda":
            return f"Triton kernels here target CUDA GPUs, not {device_type}"
        return None if torch.cuda.is_available() else "no CUDA GPU is visible to torch"
    # cuda
    if device_type != "cuda":
        return f"the cuda backend runs CUDA tensors only, not {device_type}"
    return _native.unavailable_reason("cuda")


def available(device_type: str) -> list[str]:
    """The backends that can run on ``device_type`` now."""
    return [b for b in BACKENDS if unavailable_reason(b, device_type) is None]


def select(device: torch.device | str, order: dict[str, tuple[str, ...]] | None = None) -> str:
    """The backend that runs an op whose tensors live on ``device``. ``order`` lets an op
    whose kernels rank differently on a device (measured) replace that device's automatic
    order; an explicit choice still wins."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    name = requested()
    if name is not None:
        reason = unavailable_reason(name, device_type)
        if reason is not None:
            raise RuntimeError(
                f"backend {name!r} was requested (use_backend or {ENV_VAR}) but cannot run "
                f"{device_type} tensors: {reason}")
        return name
    preference = (order or {}).get(device_type) or _PREFERENCE.get(device_type, ("reference",))
    chosen = _automatic.get((device_type, preference))
    if chosen is None:
        chosen = _automatic[device_type, preference] = _first_available(device_type, preference)
    return chosen


# The automatic choice per (device type, order), made once: what decides it (a native build
# that loaded or failed, triton installed, a visible GPU) does not change within a process, and
# every op call asks (the checks cost tens of microseconds when a layer's matmul has just
# pushed them out of the caches).
_automatic: dict[tuple[str, tuple[str, ...]], str] = {}


def _first_available(device_type: str, preference: tuple[str, ...]) -> str:
    for name in preference:
        reason = unavailable_reason(name, device_type)
        if reason is None:
            return name
        if (device_type, name) not in _logged:
            _logged.add((device_type, name))
            log.warning("shira_kernels: %s backend not used for %s tensors: %s", name, device_type, reason)
    return "reference"
