#!/usr/bin/env bash
# Build prunus's compiled CPU sparse kernels (prunus/kernels/csrc/cpu_sparse.cpp) into torch's
# extension cache (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR), once per machine and
# source version; later imports load the cached library in well under a second.
# Needs a C++ compiler (g++) and ninja (installed here from PyPI if missing). If the build fails,
# prunus still works on the PyTorch fallback kernels: this script then warns and exits 0, or 1
# with --strict.
# Usage: bash scripts/build_kernels.sh [--strict] [-v]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STRICT=0
ARGS=()
for a in "$@"; do
  case "$a" in
    --strict) STRICT=1 ;;
    -v|--verbose) ARGS+=("-v") ;;
    *) echo "build_kernels: unknown option $a" >&2; exit 2 ;;
  esac
done
VPY="${PYTHON:-.venv/bin/python}"
if ! "$VPY" -c "import ninja" 2>/dev/null; then
  echo "build_kernels: installing ninja" >&2
  "$VPY" -m pip install -q ninja
fi
if "$VPY" -c "import sys; from prunus.kernels import cpu; sys.exit(cpu.main(sys.argv[1:]))" ${ARGS[@]+"${ARGS[@]}"}; then
  exit 0
fi
echo "build_kernels: compiled kernels unavailable; prunus will use the PyTorch fallback" >&2
exit "$STRICT"
