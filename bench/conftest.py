"""Let `pytest bench/` import shira_kernels from this source tree when it is not installed, and
read the size overrides (SHIRA_BENCH_*) the benchmark files share."""
import importlib.util
import os
import sys
from pathlib import Path

if importlib.util.find_spec("shira_kernels") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def env(name: str, default: str) -> str:
    """A size override from the environment (empty or unset: the default)."""
    return os.environ.get(name, "").strip() or default


def env_ints(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def env_shapes(text: str) -> list[tuple[int, int]]:
    """ "4096x4096,11008x4096" → [(4096, 4096), (11008, 4096)] (out x in)."""
    shapes = []
    for item in text.replace(" ", "").split(","):
        if item:
            out_f, in_f = item.lower().split("x")
            shapes.append((int(out_f), int(in_f)))
    return shapes


# Settings both PEFT-facing benchmark files use (overridable from the environment).
TRAIN_TOKENS = env_ints(env("SHIRA_BENCH_TRAIN_TOKENS",
                            os.environ.get("SHIRA_BENCH_TOKENS", "").strip() or "128,2048"))
RANK = int(env("SHIRA_BENCH_R", "32"))
ROUNDS = int(env("SHIRA_BENCH_ROUNDS", "3"))
WARMUP_ROUNDS = 1
