"""Just-in-time build of the native kernels (csrc/) with torch.utils.cpp_extension and ninja.

Each extension is compiled once per (sources, flags, torch, python, cpu) and cached under
$SHIRA_KERNELS_CACHE (default ~/.cache/shira_kernels). A build that fails is not retried in the
same process; its log is kept beside the build so `shira-kernels info` can point at it, and the
package goes on with the other backends. SHIRA_KERNELS_NO_BUILD=1 skips building altogether.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch

from . import _machine
from ._files import csrc_dir, locked

log = logging.getLogger("shira_kernels")

_lock = threading.Lock()
_modules: dict[str, object] = {}
_failures: dict[str, str] = {}


def _cpu_key() -> str:
    # -march=native code must not run on another processor: its model and ISA flags are part
    # of the key (a hypervisor may show several CPU generations under one model name).
    return f"{_machine.cpu_model()} {_machine.cpu_flags()}"


def _cpu_flags(march: str) -> dict:
    return {"extra_cflags": ["-O3", f"-march={march}", "-fopenmp"], "extra_ldflags": ["-fopenmp"]}


def _spec(kind: str) -> tuple[list[Path], dict]:
    src = csrc_dir()
    if kind == "cpu":
        sources = sorted((src / "cpu").glob("*.cpp"))
        flags = _cpu_flags("native")
    else:
        sources = sorted((src / "cuda").glob("*.cu")) + sorted((src / "cuda").glob("*.cpp"))
        flags = {"extra_cflags": ["-O3"],
                 "extra_cuda_cflags": ["-O3"]}
    return sources, flags


def build_directory(kind: str) -> Path:
    """Where extension ``kind`` is built and cached: named by a hash of its sources, flags,
    torch and Python versions and the CPU (a build is reused only where it was made)."""
    sources, flags = _spec(kind)
    key = hashlib.sha256()
    for path in sources + sorted(csrc_dir().rglob("*.h")) + sorted(csrc_dir().rglob("*.cuh")):
        key.update(path.name.encode() + path.read_bytes())
    key.update(repr((flags, torch.__version__, platform.python_version(), _cpu_key())).encode())
    return _machine.cache_dir() / f"shira_{kind}_{key.hexdigest()[:16]}"


def _build(kind: str):
    if os.environ.get("SHIRA_KERNELS_NO_BUILD") == "1":
        raise RuntimeError("native build disabled by SHIRA_KERNELS_NO_BUILD=1")
    if kind == "cuda":
        if torch.version.cuda is None:
            raise RuntimeError("torch is a CPU build (torch.version.cuda is None)")
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU is visible to torch")
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} not found on PATH (set CXX)")
    sources, flags = _spec(kind)
    build_dir = build_directory(kind)
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("shira_kernels: building %s kernels in %s (first use only)", kind, build_dir)
    try:
        with locked(build_dir / "shira_build.lock"):  # across processes
            # torch's own lock file, left by a build that was killed (Ctrl-C): torch would wait
            # for it forever. Whoever made it no longer holds our lock, so it is stale.
            baton = build_dir / "lock"
            if baton.exists():
                log.warning("shira_kernels: removing %s, left by a build that did not finish",
                            baton)
                baton.unlink(missing_ok=True)
            return cpp_extension.load(name=build_dir.name, sources=[str(s) for s in sources],
                                      build_directory=str(build_dir),
                                      extra_include_paths=[str(csrc_dir())], verbose=False,
                                      **flags)
    except Exception as exc:  # the compiler's output is in the message
        log_path = build_dir / "build.log"
        log_path.write_text(str(exc))
        raise RuntimeError(f"{kind} build failed, log: {log_path}") from exc


def module(kind: str):
    """The compiled extension ``kind`` ("cpu" or "cuda"), built on first call."""
    with _lock:
        if kind in _modules:
            return _modules[kind]
        if kind in _failures:
            raise RuntimeError(_failures[kind])
        try:
            _modules[kind] = _build(kind)
        except Exception as exc:
            _failures[kind] = str(exc)
            log.warning("shira_kernels: %s kernels unavailable: %s", kind, exc)
            raise RuntimeError(_failures[kind]) from exc
        return _modules[kind]


def unavailable_reason(kind: str) -> str | None:
    """None when extension ``kind`` is (or can be) loaded, else why not. Builds if needed."""
    try:
        module(kind)
    except RuntimeError as exc:
        return str(exc)
    return None
