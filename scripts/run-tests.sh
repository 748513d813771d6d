#!/usr/bin/env bash
# The tests: set up .venv on a fresh machine, then run the test suite. Triton kernels run on
# CPU tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
EXTRAS=test,quant
source "$(dirname "$0")/_venv.sh"
# The layering first (the import-linter contracts in pyproject.toml): an import from a lower
# layer into a higher one, or of the harness from the library, fails here, before any test.
"$VENV/bin/lint-imports" --no-cache --no-logo pyproject.toml
exec "$VENV/bin/python" -m pytest tests -q "$@"
