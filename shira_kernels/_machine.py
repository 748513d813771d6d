"""The machine this process runs on, as the package's caches key it: its CPU, and the folder
where compiled kernels and tuning decisions are kept ($SHIRA_KERNELS_CACHE, default
~/.cache/shira_kernels)."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

CACHE_ENV = "SHIRA_KERNELS_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "shira_kernels")


# os.environ.get of an unset variable costs about 1.3 µs (a KeyError raised and caught), and
# every op call asks for the backend and tuning variables: on POSIX the bytes-keyed dict that
# os.environ keeps in step with its own writes (os.environ[...] = ..., monkeypatch.setenv)
# answers in one lookup. Variables set by os.putenv directly are seen by neither. os.environ is
# looked up each call (a test may replace it with a plain mapping).
_POSIX = os.name == "posix"
_ENV_KEYS: dict[str, bytes] = {}


def environment(name: str) -> str:
    """$name as os.environ has it now ("" where unset), cheaply enough for every op call."""
    data = getattr(os.environ, "_data", None) if _POSIX else None
    if type(data) is not dict:
        return os.environ.get(name, "")
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    raw = data.get(key)
    return "" if raw is None else os.fsdecode(raw)


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (they describe them all); {} elsewhere."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_model() -> str:
    info = cpu_info()
    return info.get("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_ids() -> str:
    """What tells x86 CPUs of one model name apart ("AMD EPYC" is a Zen 3, 4 or 5): cpuinfo's
    family and model, e.g. "cpuinfo family 25 model 17"; "" where /proc/cpuinfo lacks them."""
    info = cpu_info()
    ids = [f"{field} {info[key]}" for key, field in (("cpu family", "family"), ("model", "model"))
           if info.get(key)]
    return f"cpuinfo {' '.join(ids)}" if ids else ""


def cpu_name(*details: str) -> str:
    """The model name with cpuinfo's family and model and any further ``details`` in
    parentheses, e.g. "AMD EPYC (cpuinfo family 25 model 17; AVX512+BF16)"."""
    parts = [part for part in (cpu_ids(), *details) if part]
    return f"{cpu_model()} ({'; '.join(parts)})" if parts else cpu_model()


def cpu_flags() -> str:
    """The ISA flags (x86 "flags", Arm "Features"), or "" where the OS does not list them."""
    info = cpu_info()
    return info.get("flags") or info.get("Features") or ""
