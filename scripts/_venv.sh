# Sourced by run-main.sh and run-tests.sh: make (or reuse) the virtual environment and install
# the package into it with the extras named in $EXTRAS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${SHIRA_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# torch first and by an exact version: a bare 'torch' requirement can pull a several-GB CUDA
# build where the CPU one is wanted. Set TORCH_SPEC (e.g. "torch==2.13.0 --index-url ...") for
# another build; an already installed torch is kept.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  "$VENV/bin/pip" install --quiet ${TORCH_SPEC:-torch==2.13.0}
fi
"$VENV/bin/pip" install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
