"""Backend choice: explicit choices, the environment variable, and the fallback without a
compiler."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import shira_kernels
from shira_kernels import backends

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with shira_kernels.use_backend("fast"):
            pass


def test_explicit_choice_that_cannot_run_raises_with_reason():
    w, i, v = [torch.zeros(4)], [torch.tensor([1])], [torch.ones(1)]
    with shira_kernels.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' was requested .* CUDA tensors only"):
            shira_kernels.scatter_swap_(w, i, v)
    assert torch.equal(w[0], torch.zeros(4))


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.requested() is None
    with shira_kernels.use_backend("reference"):
        assert backends.select("cpu") == "reference"
        with shira_kernels.use_backend("cpu"):
            assert backends.select("cpu") == "cpu"
        assert backends.requested() == "reference"
    assert backends.requested() is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select("cpu") == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    assert backends.select("cpu") == "cpu"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        backends.select("cpu")


def test_environment_reads_what_os_environ_holds_now(monkeypatch):
    """The per-call reader of the package's variables sees every write through os.environ at
    once (set, changed, deleted; non-ASCII values as os.environ decodes them)."""
    from shira_kernels import _machine
    name = "SHIRA_KERNELS_TEST_VARIABLE"
    monkeypatch.delenv(name, raising=False)
    assert _machine.environment(name) == ""
    for value in ("reference", " off ", "ünïcode", ""):
        monkeypatch.setenv(name, value)
        assert _machine.environment(name) == os.environ[name] == value
    os.environ[name] = "direct"
    assert _machine.environment(name) == "direct"
    del os.environ[name]
    assert _machine.environment(name) == ""
    monkeypatch.setattr(os, "environ", {name: "replaced"})  # as mock.patch("os.environ", ...)
    assert _machine.environment(name) == "replaced"


def test_automatic_choice_on_cpu_is_the_native_kernel(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.select("cpu") == "cpu"
    assert "cpu" in backends.available("cpu") and "reference" in backends.available("cpu")
    assert "cuda" not in backends.available("cpu")


def test_an_op_can_reorder_the_automatic_choice_but_not_an_explicit_one(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    order = {"cpu": ("reference", "cpu")}
    assert backends.select("cpu", order) == "reference"
    assert backends.select("cpu", {"cuda": ("triton",)}) == "cpu"  # other devices untouched
    with shira_kernels.use_backend("cpu"):
        assert backends.select("cpu", order) == "cpu"


def test_ops_with_a_measured_order_on_cuda_use_it(monkeypatch):
    # scatter_swap_ (always) and binary_linear (above GEMV_MAX_TOKENS tokens) try Triton first
    # on CUDA tensors; read without a GPU by recording what the ops ask for.
    from shira_kernels.ops import binary, scatter_swap

    asked = []
    monkeypatch.setattr(backends, "select", lambda device, order=None: asked.append(order) or "reference")
    scatter_swap.swap_unchecked([torch.zeros(3)], [torch.tensor([1])], [torch.ones(1)])
    bw = shira_kernels.BinaryWeight.from_float(torch.randn(4, 40))
    shira_kernels.binary_linear(torch.randn(binary.GEMV_MAX_TOKENS, 40), bw)
    shira_kernels.binary_linear(torch.randn(binary.GEMV_MAX_TOKENS + 1, 40), bw)
    triton_first = ("triton", "cuda", "reference")
    assert asked == [{"cuda": triton_first}, None, {"cuda": triton_first}]


def _run_without_compiler(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"),
               SHIRA_KERNELS_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    env.pop(backends.ENV_VAR, None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_without_a_compiler_runs_on_the_reference_and_says_why_once(tmp_path):
    result = _run_without_compiler("""
        import logging, torch, shira_kernels
        logging.basicConfig(level=logging.WARNING)
        w, i, v = [torch.zeros(5)], [torch.tensor([0, 3])], [torch.ones(2)]
        shira_kernels.scatter_swap_(w, i, v)
        shira_kernels.scatter_swap_(w, i, v)
        shira_kernels.scatter_swap_(w, i, v)
        print(w[0].tolist(), shira_kernels.backends.select("cpu"))
        try:
            with shira_kernels.use_backend("cpu"):
                shira_kernels.scatter_swap_(w, i, v)
        except RuntimeError as e:
            print("explicit:", e)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[1.0, 0.0, 0.0, 1.0, 0.0] reference" in result.stdout
    assert "explicit: backend 'cpu' was requested" in result.stdout
    assert "no C++ compiler" in result.stdout
    # The reason for falling back is logged once, not on every call.
    assert result.stderr.count("cpu backend not used for cpu tensors") == 1, result.stderr


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_process(tmp_path):
    # torch's cpp_extension waits forever on its lock file when a build was killed mid-way
    # (Ctrl-C); the package removes it under a lock of its own that dies with its holder. On a
    # copy of this process's build in a cache of the test's own, so that no other build (of
    # another process sharing the machine's cache) can take the lock file away first.
    import shutil

    from shira_kernels import _native

    _native.module("cpu")  # built (or loaded) here first
    built = _native.build_directory("cpu")
    copy = tmp_path / "cache" / built.name
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock", "*.lock"))
    (copy / "lock").touch()
    env = dict(os.environ, PYTHONPATH=str(ROOT), SHIRA_KERNELS_CACHE=str(tmp_path / "cache"))
    env.pop(backends.ENV_VAR, None)
    result = subprocess.run([sys.executable, "-c", "from shira_kernels import _native; "
                             "_native.module('cpu'); print(_native.build_directory('cpu'))"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(copy)
    assert not (copy / "lock").exists()
    assert "left by a build that did not finish" in result.stderr
