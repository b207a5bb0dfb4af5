#!/usr/bin/env bash
# The main job on the bundled default: set up a fresh machine, then prune SmolLM2-135M with Wanda and
# SparseGPT at 50% and 2:4, calibrated on Emma (32 x 512 tokens) and evaluated on Pride and Prejudice
# (32 x 512 tokens, to stay well under 20 minutes on 2 cores; bench/oneshot_llm.py uses 64), beside
# dense, magnitude and random. Writes runs/demo.json and runs/demo.png.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
mkdir -p runs
exec .venv/bin/prunus prune smollm2-135m --method wanda,sparsegpt --sparsity 50%,2:4 \
  --calib book:emma --eval book:pride --nsamples 32 --seqlen 512 --windows 32 \
  --json runs/demo.json --plot runs/demo.png "$@"
