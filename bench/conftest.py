"""Let `pytest bench/` import shira_kernels from this source tree when it is not installed."""
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("shira_kernels") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
