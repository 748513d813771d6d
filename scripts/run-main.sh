#!/usr/bin/env bash
# The main job: set up .venv on a fresh machine (the package with its triton and bench extras:
# matplotlib and peft), then run `shira-kernels demo` and `shira-kernels bench --quick --out
# results/`. Arguments, if given, replace both and run as one command, e.g.
#   bash scripts/run-main.sh info
#   bash scripts/run-main.sh bench --out results/full      # the full-size benchmark
EXTRAS=triton,bench
source "$(dirname "$0")/_venv.sh"
if [ "$#" -gt 0 ]; then
  exec "$VENV/bin/shira-kernels" "$@"
fi
"$VENV/bin/shira-kernels" demo
exec "$VENV/bin/shira-kernels" bench --quick --out results/
