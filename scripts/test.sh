#!/usr/bin/env bash
# Set up (first time only), lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
# two workers: the tests run one torch thread each, and CI has two cores
exec .venv/bin/python -m pytest -q -n 2 "$@"
