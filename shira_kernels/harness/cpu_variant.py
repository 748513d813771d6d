"""The CPU extension built from another set of sources or for another target than the package's
own: for A/B timings against another checkout (bench/ab_cpu_kernels.py) and for testing the code
that a machine other than this one would get (tests/test_cpu_avx2_build.py: AVX2 without
AVX-512)."""
from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import torch

from .. import _machine
from .._native import _cpu_flags, _cpu_key


def build_cpu_variant(src: Path, march: str = "native"):
    """The CPU extension from the sources in ``src`` (another checkout's csrc/cpu, say) built
    for ``-march=march``, cached like the package's own; for A/B timings and for testing the
    code a target other than this machine's would get (e.g. AVX2 without AVX-512)."""
    from torch.utils import cpp_extension
    sources = sorted(Path(src).glob("*.cpp"))
    if not sources:
        raise FileNotFoundError(f"no *.cpp under {src}")
    key = hashlib.sha256()
    # The headers beside the sources and one level up (csrc/dispatch.h, shared with CUDA).
    for path in sources + sorted(Path(src).glob("*.h")) + sorted(Path(src).parent.glob("*.h")):
        key.update(path.name.encode() + path.read_bytes())
    key.update(repr((march, torch.__version__, platform.python_version(), _cpu_key())).encode())
    name = f"shira_cpu_variant_{key.hexdigest()[:16]}"
    build_dir = _machine.cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=name, sources=[str(p) for p in sources],
                              build_directory=str(build_dir), extra_include_paths=[str(src)],
                              verbose=False, **_cpu_flags(march))
