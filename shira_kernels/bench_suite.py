"""Deprecated alias of shira_kernels.harness.bench_suite: the benchmark harness and the demo
moved out of the library's core into shira_kernels.harness. Importing this module warns
and gives that one."""
import sys
import warnings

from .harness import bench_suite as _moved

warnings.warn("shira_kernels.bench_suite is deprecated: import shira_kernels.harness.bench_suite",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
