"""Compile every Triton kernel for real GPU targets without a GPU (run by test_triton_compile.py).

Triton's interpreter (how the other tests run the kernels on CPU tensors) never lowers a kernel
to PTX, so a kernel that only the GPU compiler rejects (a dot below 16x16, a bad pointer cast,
an unsupported dtype) would pass them. This script calls each launcher of shira_kernels.triton
on small CPU tensors with Triton's launch replaced by a recorder, so it sees exactly the
argument types and constexprs the launchers use, then compiles each recorded launch with
triton.compile for the requested targets (ptxas ships with Triton). It must run in a process
where TRITON_INTERPRET is unset. Prints one JSON line per (kernel, signature, target).
"""
from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

recorded: dict[tuple, tuple] = {}


def _record(self, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: keep the signature and constexprs of the launch."""
    values = dict(zip(self.arg_names, args)) | kwargs
    signature, constexprs = {}, {}
    for param in self.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{self.__name__}: no Triton type for {param.name}={value!r}")
    key = (self.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())))
    recorded[key] = (self, signature, constexprs)


def exercise_launchers() -> None:
    """Call every launcher in each configuration the ops can give it."""
    from shira_kernels.formats import BinaryWeight, SparseDelta
    from shira_kernels.ops.scatter_swap import swap_table
    from shira_kernels.triton import binary, scatter_swap, sparse_delta

    for dtype in DTYPES:
        for in_f in (70, 40000):  # int16 and int32 column indices
            delta = SparseDelta.from_mask(torch.rand(9, in_f) < 0.1, torch.randn(9, in_f).to(dtype))
            s = delta.structure
            x, y = torch.randn(5, in_f).to(dtype), torch.randn(5, 9).to(dtype)
            sparse_delta.spmm(y, x, s.row_offsets, s.cols, delta.values, 0.5)
            sparse_delta.spmm(x, y, s.t_offsets, s.t_cols, delta.values[s.t_perm], 0.5)
            sparse_delta.sddmm(y, x, s.rows, s.cols)
            order = torch.tensor([4, 0, 2, 1, 3])  # two groups of rows, the same adapter
            starts = {0: (0, delta.values.numel(), 0)}
            sparse_delta.grouped_spmm(y, x, order, [(0, 2), (2, 5)], [0, 0], starts,
                                      s.row_offsets, s.cols, delta.values, {0: 0.5})
            sparse_delta.grouped_sddmm(y, x, order, [(0, 2), (2, 5)], [0, 0], starts, s.rows,
                                       s.cols, {0: 0.5})
            weight = torch.randn(9, in_f).to(dtype)
            for idx in (delta.flat_indices, delta.flat_indices.long()):
                sparse_delta.add_at_indices(weight, weight, idx, delta.values, 0.5)
                sparse_delta.add_at_indices(weight, weight, idx, delta.values, 0.5,
                                            torch.empty_like(delta.values))
        w, i, v = [torch.randn(50).to(dtype)], [torch.arange(7)], [torch.randn(7).to(dtype)]
        scatter_swap.scatter_swap(*swap_table(w, i, v, 1024), 1024)
        for method in ("petl", "row"):
            bw = BinaryWeight.from_float(torch.randn(33, 100), method)
            x = torch.randn(3, 100).to(dtype)
            for bias in (None, torch.randn(33).to(dtype)):
                binary.binary_linear(x, bw.packed, bw.alpha, bw.mu, bias, 100)
            for rank in (1, 33):  # padded to 32 and to 64 ranks
                down = BinaryWeight.from_float(torch.randn(rank, 100), method)
                up = BinaryWeight.from_float(torch.randn(40, rank), "row")
                for relu in (False, True):
                    binary.binary_lora(x, (down.packed, down.alpha, down.mu),
                                       (up.packed, up.alpha, up.mu), 0.5, relu)


def main(archs: list[int]) -> int:
    JITFunction.run = _record
    exercise_launchers()
    failures = 0
    for (name, _, _), (fn, signature, constexprs) in sorted(recorded.items(), key=str):
        for arch in archs:
            line = {"kernel": name, "arch": arch, "signature": signature,
                    "constexprs": {k: repr(v) for k, v in constexprs.items()}}
            try:
                compiled = triton.compile(ASTSource(fn, signature, constexprs),
                                          target=GPUTarget("cuda", arch, 32))
                line["ok"] = bool(compiled.asm.get("cubin"))
                line["shared_bytes"] = compiled.metadata.shared
            except Exception as exc:  # the compiler's message is the finding
                line["ok"], line["error"] = False, f"{type(exc).__name__}: {exc}"[:4000]
            failures += not line["ok"]
            print(json.dumps(line), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [80, 90]))
