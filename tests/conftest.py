"""Shared test setup. Triton kernels run on CPU tensors through Triton's interpreter, which must
be switched on before triton is first imported. On a machine with a CUDA GPU, run the tests with
TRITON_INTERPRET=0 (scripts/gpu-check.sh does): the `backend` fixture then also runs every
backend test on CUDA tensors with the cuda, triton (compiled) and reference backends."""
import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Deterministic choices: "auto" runs the tuning table's static strategy, nothing is measured
# (tests/test_autotune.py turns measuring on where it tests it).
os.environ.setdefault("SHIRA_KERNELS_TUNE", "off")

import pytest  # noqa: E402
import torch  # noqa: E402

import shira_kernels  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def cpu_backends():
    """Every backend that can run CPU tensors here; triton only when it is installed and
    interpreted."""
    names = ["reference", "cpu"]
    if HAS_TRITON and INTERPRETED:
        names.append("triton")
    return names


def backend_params():
    """(device, backend) pairs: CPU ones keep their bare ids; CUDA ones read 'cuda-<backend>'."""
    params = [pytest.param(("cpu", name), id=name) for name in cpu_backends()]
    if torch.cuda.is_available():
        gpu = ["cuda", "reference"] + (["triton"] if HAS_TRITON and not INTERPRETED else [])
        params += [pytest.param(("cuda", name), id=f"cuda-{name}") for name in gpu]
    return params


@pytest.fixture(params=backend_params())
def _device_and_backend(request):
    return request.param


@pytest.fixture
def device(_device_and_backend):
    """The device the test's tensors live on, matching `backend`."""
    return torch.device(_device_and_backend[0])


@pytest.fixture
def backend(_device_and_backend):
    """Run the test body under each backend, failing (not skipping) if one cannot build."""
    device_type, name = _device_and_backend
    reason = shira_kernels.backends.unavailable_reason(name, device_type)
    assert reason is None, f"backend {name} unavailable for {device_type}: {reason}"
    with shira_kernels.use_backend(name):
        yield name


def with_threads(fn, threads: int):
    """(fn() with torch's thread count as it is, fn() with ``threads`` threads): the CPU
    kernels must give the same bits however their work is split."""
    before = torch.get_num_threads()
    expected = fn()
    try:
        torch.set_num_threads(threads)
        got = fn()
    finally:
        torch.set_num_threads(before)
    return expected, got
