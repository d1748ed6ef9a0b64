#!/usr/bin/env bash
# Fine-tune the embedded feature draft on the target's own chat answers, on the lent GPU
# (after staging /root/w/smollm2.gguf as in ../shared/gpu/GPU.md). Two stages, one device call
# each (a call may run 10 minutes):
#   bash benchmarks/gpu_finetune_chat.sh data    # 16,000 chat answers + 10 M tokens of code/docs
#   bash benchmarks/gpu_finetune_chat.sh train   # 450 s from the shipped draft, 16,384 kept ids picked anew
set -euo pipefail
stage=${1:?data or train}
common=(--target /root/w/smollm2.gguf --inputs features --layers 1 --init-from speculant/embedded/smollm2-135m-draft
        --batch-size 32 --seq-len 1024 --humaneval-file /root/w/HumanEval.jsonl.gz --device cuda --no-progress
        --engine-prompts 0)
case $stage in
  data)  # steps 0: build the corpus (chat answers first), measure the shipped draft on it, train nothing
    python -m speculant.distill.cli "${common[@]}" --out /root/gen --steps 0 --train-tokens 20000000 \
      --chat-samples 16000 --chat-prompts wide --chat-repeat 2 --chat-batch-size 1024 --chat-max-new-tokens 320 ;;
  train)
    python -m speculant.distill.cli "${common[@]}" --data /root/gen/corpus.safetensors --out /root/ft \
      --time-limit ${TIME_LIMIT:-450} --steps 100000 --lr ${LR:-4e-4} --checkpoint-every 500 \
      --vocab 16384 --init-vocab corpus ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
