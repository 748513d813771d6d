#!/usr/bin/env bash
# The main job: set up .venv on a fresh machine, then run `shira-kernels` (default: info).
EXTRAS=triton
source "$(dirname "$0")/_venv.sh"
exec "$VENV/bin/shira-kernels" "${@:-info}"
