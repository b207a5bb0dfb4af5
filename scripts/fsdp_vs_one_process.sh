#!/usr/bin/env bash
# FSDP2 on 2 CPU ranks against the same run in one process (--micro-batches 2), for every method.
# Prints, per method, whether the final masks, the final parameters and every update's digests of the
# whole masks and gradients are identical. Usage: bash scripts/fsdp_vs_one_process.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-$(mktemp -d)}
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 TQDM_DISABLE=1 GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
COMMON="--task digits --model lenet300 --epochs 2 --batch-size 64 --train-subset 512 --no-progress"
port=29600
while read -r method flags; do
  d="$OUT/$method"; rm -rf "$d"; mkdir -p "$d"
  PRUNUS_DDP_DIGESTS="$d/one" $PY -m prunus train $COMMON --method "$method" $flags --micro-batches 2 \
    > "$d/one.log" 2>&1
  port=$((port + 1))
  PRUNUS_DDP_DIGESTS="$d/fsdp" $PY -m torch.distributed.run --nproc_per_node 2 --nnodes 1 \
    --master_addr 127.0.0.1 --master_port $port -m prunus train $COMMON --method "$method" $flags \
    --parallel fsdp > "$d/fsdp.log" 2>&1
  $PY - "$d" "$method" <<'PY'
import json, sys
d, method = sys.argv[1:]
one = json.load(open(f"{d}/one/rank0.json"))["runs"][0]
r0, r1 = (json.load(open(f"{d}/fsdp/rank{r}.json"))["runs"][0] for r in (0, 1))
same = lambda k: one[k] == r0[k] == r1[k]
print(f"{method:14} masks {same('masks_sha')}  params {same('params_sha')}  "
      f"updates {same('updates')} ({len(one['updates'])})  accuracy {one['metric']:.2f} / {r0['metric']:.2f}")
PY
done <<'EOF2'
rigl -o delta_t=2 --sparsity 90%
set -o delta_t=2 --sparsity 90%
gmp -o frequency=2 --sparsity 90%
static --sparsity 90%
lth -o rounds=1 --sparsity 80%
lth_reinit -o rounds=1 --sparsity 80%
spdf --sparsity 75% -o dense_from=0.5
srste --sparsity 2:4
pgf --sparsity 2:4
random_search --sparsity 90% -o candidates=2 --probe-epochs 0.5
sparse_ift --sparsity 75% -o delta_t=2
EOF2
