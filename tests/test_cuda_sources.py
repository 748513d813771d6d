"""Compile-only checks for the CUDA sources in csrc/cuda.

The .cu files must build with a plain nvcc (no CUDA build of torch needed), so
this runs on machines without a GPU as long as the CUDA toolkit is installed.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO_ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")

# Any #include of a torch / ATen / c10 header, with <> or "" and optional spaces.
TORCH_INCLUDE_RE = re.compile(
    r'^\s*#\s*include\s*[<"]\s*(torch|ATen|c10)(/|\.h\b|\.hpp\b)', re.MULTILINE
)
LOCAL_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def _reached_files(roots):
    """roots and every file they reach through #include "...", found as nvcc finds it: beside
    the including file, then in CUDA_DIR (the -I below). Headers outside csrc/cuda count too
    (csrc/dispatch.h, shared with the CPU kernels)."""
    seen, todo = set(), [p.resolve() for p in roots]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in LOCAL_INCLUDE_RE.findall(path.read_text(encoding="utf-8")):
            found = next((base / name for base in (path.parent, CUDA_DIR)
                          if (base / name).is_file()), None)
            if found is not None:
                todo.append(found.resolve())
    return sorted(seen)


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = "/usr/local/cuda/bin/nvcc"
    if os.path.isfile(fallback) and os.access(fallback, os.X_OK):
        return fallback
    return None


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu files found in {CUDA_DIR}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu_file", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_compiles(cu_file, arch, tmp_path):
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [
        nvcc,
        "-std=c++17",
        f"-arch={arch}",
        "-I",
        str(CUDA_DIR),
        "-c",
        str(cu_file),
        "-o",
        str(tmp_path / "x.o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, (
        f"nvcc failed ({proc.returncode}) for {cu_file.name} [{arch}]\n"
        f"command: {' '.join(cmd)}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


def test_cuda_sources_do_not_include_torch():
    # Kernels and the headers they include must build without torch; only
    # bindings.cpp may include torch/ATen/c10.
    headers = sorted(CUDA_DIR.glob("*.cuh")) + sorted(CUDA_DIR.glob("*.h"))
    sources = _reached_files(CU_FILES + headers)
    assert (REPO_ROOT / "csrc" / "dispatch.h").resolve() in sources
    offenders = []
    for path in sources:
        for match in TORCH_INCLUDE_RE.finditer(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(REPO_ROOT)}: {match.group(0).strip()}")
    assert not offenders, "torch headers included in plain CUDA sources:\n" + "\n".join(offenders)
