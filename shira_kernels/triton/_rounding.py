"""The one cast of fp32 results to an output's element type that every Triton store uses.

Triton's interpreter (how CI runs these kernels on CPU tensors) casts fp32 to bf16 by
truncation, whatever rounding is asked for; compiled Triton and torch round to nearest even.
Under the interpreter the bf16 cast is therefore rounded here by hand, so interpreted results
match torch's bit for bit where the fp32 values do."""
import os

import triton
import triton.language as tl

# Whether these kernels run in Triton's interpreter (the other Triton files ask here too).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def to_element(v, ty: tl.constexpr):
    """fp32 v in element type ty, rounded to nearest even."""
    if BY_HAND and ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN keeps its quiet bit: rounding its payload up could make it an infinity.
        rounded = tl.where(v != v, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ty)
