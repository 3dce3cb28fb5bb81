#!/usr/bin/env bash
# Set up (first time only) and run the main job: closed-loop PushT with ParaDiGMS on the committed
# checkpoint. Extra arguments are Hydra overrides, e.g. `./scripts/run.sh solver=newton warm_start=true`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python eval/rollout.py task=pusht solver=paradigms "$@"
