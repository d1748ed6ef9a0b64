#!/usr/bin/env bash
# Re-cuts the staged GGUF pieces in .gpu/ (../shared/gpu/stage-models, stage-qwen) so that each device call,
# which carries at most 64 MiB *with the project's tracked tree*, still fits: the shipped drafts make the tree
# ~39 MiB, more than the 40 MiB Qwen pieces and 32 MiB SmolLM2 pieces leave room for. Run from the project's
# root after staging:
#   bash benchmarks/device_pieces.sh                 # every staged model: smollm2, qwen-1.5b, qwen-0.5b
#   bash benchmarks/device_pieces.sh qwen-1.5b       # one
# Each model's pieces are rejoined, checked against its .sha256, and cut again at the largest whole MiB that
# fits (64 MiB - the tree - 2 MiB for the small files a call carries beside a piece: HumanEval, the gguf wheel).
# Prints the piece count: one device call per piece, as ../shared/gpu/GPU.md says, then the joining call.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
size=$(( (64 * 1048576 - tree - 2 * 1048576) / 1048576 ))
[ "$size" -ge 4 ] || { echo "the tracked tree ($tree bytes) leaves no room for pieces" >&2; exit 1; }
names=("$@"); [ ${#names[@]} -gt 0 ] || names=(smollm2 qwen-1.5b qwen-0.5b)
for name in "${names[@]}"; do
  [ -f ".gpu/$name.sha256" ] || { echo "$name: not staged (.gpu/$name.sha256 missing)"; continue; }
  largest=$(stat -c %s .gpu/"$name".part* | sort -n | tail -1)
  if [ "$largest" -gt $(( size * 1048576 )) ]; then
    whole=".gpu/$name.whole"
    cat .gpu/"$name".part* > "$whole"
    echo "$(cat ".gpu/$name.sha256")  $whole" | sha256sum -c --quiet || { rm -f "$whole"; exit 1; }
    rm .gpu/"$name".part*
    split -b "${size}M" -d -a 2 "$whole" ".gpu/$name.part"
    rm "$whole"
  fi
  echo "$name: $(ls .gpu/"$name".part* | wc -l) pieces of at most $(( $(stat -c %s .gpu/"$name".part* | sort -n | tail -1) / 1048576 )) MiB (tree $(( tree / 1048576 )) MiB)"
done
