"""Every Triton kernel, in every launch configuration its launcher uses, compiles to machine
code for sm_80 and sm_90 (no GPU needed: tests/triton_aot.py records the launches and calls
triton.compile for those targets in a process without the interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
HERE = Path(__file__).resolve().parent


def test_every_triton_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "triton_aot.py"), "80", "90"],
                          capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=900)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no kernel was compiled (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    failed = [f"{d['kernel']} sm_{d['arch']} {d['signature']} {d['constexprs']}:\n{d['error']}"
              for d in lines if not d["ok"]]
    assert not failed, "\n\n".join(failed)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = {d["kernel"] for d in lines}
    assert kernels == {"_spmm_kernel", "_grouped_spmm_kernel", "_sddmm_kernel",
                       "_grouped_sddmm_kernel", "_add_at_indices_kernel",
                       "_scatter_swap_kernel", "_binary_linear_kernel", "_binary_lora_kernel"}
    assert {d["arch"] for d in lines} == {80, 90}
