"""Shared test setup. Triton kernels run on CPU tensors through Triton's interpreter, which must
be switched on before triton is first imported."""
import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import shira_kernels  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cpu_backends():
    """Every backend that can run CPU tensors here; triton only when it is installed."""
    names = ["reference", "cpu"]
    if importlib.util.find_spec("triton") is not None:
        names.append("triton")
    return names


@pytest.fixture(params=cpu_backends())
def backend(request):
    """Run the test body under each backend, failing (not skipping) if one cannot build."""
    reason = shira_kernels.backends.unavailable_reason(request.param, "cpu")
    assert reason is None, f"backend {request.param} unavailable: {reason}"
    with shira_kernels.use_backend(request.param):
        yield request.param
