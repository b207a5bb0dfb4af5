#!/usr/bin/env bash
# Build the separate environment for the DeepSparse peer benchmark: <repo>/.venv-deepsparse.
#
# DeepSparse's last wheel is 1.8.0, for CPython 3.11 on x86_64 (1.9.0 is an sdist that does not
# build), so this venv is made with python3.11 (PYTHON= overrides). torch is installed FIRST and
# then pinned by a constraints file, so that no later install can swap it for a multi-GB CUDA
# build. torch is the same version as the prunus venv's, because bench/peer_deepsparse.py imports
# prunus from this checkout in the same process as DeepSparse: prunus's compiled CPU kernels are
# built (scripts/build_kernels.sh) for this venv's torch into the venv's own extension cache,
# .venv-deepsparse/torch_extensions (TORCH_EXTENSIONS_DIR; peer_deepsparse.py uses it whenever it
# exists). Not ~/.cache/torch_extensions: a build there names this venv's torch headers, so the
# prunus venv would rebuild the kernels (about a minute) on its next import, and back again.
#
# prunus goes in editable and WITHOUT its dependencies (transformers, matplotlib, gguf, ... are
# not needed to build and time a kernel), plus the few it imports on the kernel path: safetensors,
# tqdm, pyyaml, and ninja (plus a C++ compiler, g++) for the kernel build. numpy stays < 2 for
# DeepSparse.
#
# Usage:
#   bash bench/setup_deepsparse.sh             # idempotent; re-running only re-checks
#   PYTHON=/path/to/python3.11 bash bench/setup_deepsparse.sh
#   PRUNUS_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash bench/setup_deepsparse.sh
#       (where the default package index would resolve torch==2.13.0 to a CUDA build)
#
# Then:
#   .venv-deepsparse/bin/python bench/peer_deepsparse.py --quick
#   .venv-deepsparse/bin/python bench/peer_deepsparse.py --json runs/peer_deepsparse.json
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-deepsparse"
PY="${PYTHON:-python3.11}"
TORCH_VERSION="2.13.0"
DEEPSPARSE_VERSION="1.8.0"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! command -v "$PY" >/dev/null 2>&1 || ! "$PY" -c "import sys; sys.exit(sys.version_info[:2] != (3, 11))" 2>/dev/null; then
    echo "setup_deepsparse: error: $PY (Python 3.11) not found: deepsparse==$DEEPSPARSE_VERSION has wheels" \
         "only for CPython 3.11; install it or set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if [ "$(uname -m)" != "x86_64" ]; then
    echo "setup_deepsparse: error: deepsparse==$DEEPSPARSE_VERSION has wheels only for x86_64, not $(uname -m)" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_deepsparse: creating $VENV ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

CONSTRAINTS="$VENV/constraints.txt"
cat > "$CONSTRAINTS" <<EOF
torch==$TORCH_VERSION
deepsparse==$DEEPSPARSE_VERSION
onnx<1.17
numpy<2
EOF

TORCH_INDEX_ARGS=()
if [ -n "${PRUNUS_TORCH_INDEX:-}" ]; then
    TORCH_INDEX_ARGS=(--index-url "$PRUNUS_TORCH_INDEX")
fi

if ! "$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "setup_deepsparse: torch==$TORCH_VERSION (first)"
    "$VPY" -m pip install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_ARGS[@]+"${TORCH_INDEX_ARGS[@]}"}
fi

if ! "$VPY" -c "import deepsparse, onnx, numpy, sys; sys.exit(deepsparse.__version__ != '$DEEPSPARSE_VERSION' or int(numpy.__version__.split('.')[0]) >= 2)" 2>/dev/null; then
    echo "setup_deepsparse: deepsparse==$DEEPSPARSE_VERSION, onnx<1.17, numpy<2"
    "$VPY" -m pip install -q -c "$CONSTRAINTS" "deepsparse==$DEEPSPARSE_VERSION" "onnx<1.17" "numpy<2"
fi

if ! "$VPY" -c "import prunus.kernels, safetensors, tqdm, yaml, ninja" 2>/dev/null \
        || [ "$("$VPY" -c 'import os, prunus; print(os.path.dirname(os.path.dirname(os.path.abspath(prunus.__file__))))' 2>/dev/null)" != "$ROOT" ]; then
    echo "setup_deepsparse: prunus (editable, --no-deps) from $ROOT, safetensors, tqdm, pyyaml, ninja"
    "$VPY" -m pip install -q -c "$CONSTRAINTS" safetensors tqdm pyyaml ninja
    "$VPY" -m pip install -q -c "$CONSTRAINTS" --no-deps -e "$ROOT"
fi

"$VPY" - <<'EOF'
import sys, torch, numpy, onnx, deepsparse
if torch.version.cuda is not None and not torch.cuda.is_available():
    print(f"setup_deepsparse: warning: torch {torch.__version__} is a CUDA build on a machine without CUDA",
          file=sys.stderr)
print(f"setup_deepsparse: torch {torch.__version__}, deepsparse {deepsparse.__version__}, "
      f"onnx {onnx.__version__}, numpy {numpy.__version__}")
EOF

# prunus's compiled CPU kernels for this venv's torch, in the venv's own cache (a later run only
# loads them). Without them the benchmark would time only the torch.sparse fallback: fail here.
mkdir -p "$VENV/torch_extensions"
(cd "$ROOT" && TORCH_EXTENSIONS_DIR="$VENV/torch_extensions" PYTHON="$VPY" bash scripts/build_kernels.sh --strict)
"$VPY" -c "import deepsparse; print(f'setup_deepsparse: ok: deepsparse {deepsparse.__version__} in $VENV')"
