#!/usr/bin/env bash
# The tests: set up .venv on a fresh machine, then run the test suite. Triton kernels run on
# CPU tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
EXTRAS=test
source "$(dirname "$0")/_venv.sh"
exec "$VENV/bin/python" -m pytest tests -q "$@"
