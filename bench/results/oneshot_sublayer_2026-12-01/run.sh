#!/bin/bash
# SparseGPT + reconstruct-sub (4 epochs per phase, lr 1e-3) on SmolLM2-135M, the one-shot benchmark's settings.
cd "$(dirname "$0")/../../.."
D=bench/results/oneshot_sublayer_2026-12-01
PY=${PY:-/work/main/.venv/bin/python}
for sp in 0.5 2:4; do
  name=$([ "$sp" = "0.5" ] && echo s50 || echo nm24)
  cmd="$PY -m prunus prune smollm2-135m steps.reconstruct-sub.epochs=4 steps.reconstruct-sub.lr=1e-3 --method sparsegpt --sparsity $sp --step reconstruct-sub --calib book:emma --eval book:pride --nsamples 32 --seqlen 512 --windows 64 --no-baselines --quiet --json $D/$name.json"
  echo "$ $cmd" > $D/$name.log
  /usr/bin/time -v env PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TQDM_DISABLE=1 $cmd >> $D/$name.log 2>&1
done
