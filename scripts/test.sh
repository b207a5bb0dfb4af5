#!/usr/bin/env bash
# The test command: set up (without the real model or books) and run the fast suite.
# Slow tests on the real SmolLM2-135M: bash scripts/setup.sh && .venv/bin/python -m pytest -m slow
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh --no-data
exec .venv/bin/python -m pytest -q "$@"
