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


def test_cuda_bindings_compile_against_this_torch(tmp_path):
    """bindings.cpp, the one CUDA-side file that includes torch, type-checks against this
    torch's headers and kernels.h (g++ -fsyntax-only, the flags torch's own extension builds
    use), so a binding that no longer matches its launcher or torch's API fails here, on a
    machine without a GPU or a CUDA build of torch. A CPU wheel ships c10/cuda's headers but
    not the one CMake generates for a CUDA build: a stand-in with its one macro is provided."""
    nvcc = _find_nvcc()
    cxx = shutil.which("g++") or shutil.which("c++")
    if nvcc is None or cxx is None:
        pytest.skip("nvcc (for the CUDA runtime headers) or a C++ compiler not found")
    import sysconfig

    from torch.utils import cpp_extension

    cuda_include = next((d for d in (Path(os.environ.get("CUDA_HOME", "/nonexistent")),
                                     Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda"))
                         if (d / "include" / "cuda_runtime.h").is_file()), None)
    if cuda_include is None:
        pytest.skip("the CUDA runtime headers (cuda_runtime.h) not found beside nvcc")
    includes = [str(tmp_path)] + cpp_extension.include_paths() + [
        sysconfig.get_paths()["include"], str(cuda_include / "include")]
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in includes):
        shim = tmp_path / "c10/cuda/impl/cuda_cmake_macros.h"
        shim.parent.mkdir(parents=True)
        shim.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=shira_kernels_cuda",
           *[f"-I{p}" for p in includes], str(CUDA_DIR / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, (f"bindings.cpp does not compile ({proc.returncode})\n"
                                  f"command: {' '.join(cmd)}\nstderr:\n{proc.stderr[-6000:]}")
