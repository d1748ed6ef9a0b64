#!/usr/bin/env bash
# Cuts the staged model files in .gpu/ (../shared/gpu/stage-models, stage-qwen) into pieces the lent GPU's calls
# can carry, and switches the checkout for piece calls. Each device call carries at most 64 MiB *with the project's
# tracked tree* (the shipped drafts and benchmark results make it ~39 MiB). Two ways, run from the project's root:
#
#   bash benchmarks/gpu_stage.sh fit [NAME...]   # .gpu/NAME.partNN re-cut at the largest whole MiB the tree leaves
#       (64 MiB - the tree - 2 MiB for a call's small files: HumanEval, the gguf wheel); NAME: smollm2, qwen-1.5b,
#       qwen-0.5b (default all staged). One device call per piece, the checkout as it is. The Qwen pair: 68 calls.
#   bash benchmarks/gpu_stage.sh big [NAME...]   # .gpu/big/NAME.NN of 62 MiB, for calls made from an empty checkout
#       (the .partNN pieces stay). The Qwen pair: 26 calls.
#   bash benchmarks/gpu_stage.sh empty           # the checkout -> an empty commit (refused with uncommitted changes)
#       ... then the piece calls back to back (a pause of more than 30 s lets the machine go):
#       run(command="mkdir -p /root/w && cp .gpu/big/qwen-1.5b.00 /root/w/", carry=[".gpu/big/qwen-1.5b.00"]), ...
#   bash .git/gpu_stage.sh restore               # back to the branch, before the call that runs the work (the empty
#       checkout has no benchmarks/: `empty` leaves this script in .git/); that call joins the pieces
#       (cat /root/w/qwen-1.5b.* > /root/w/qwen-1.5b.gguf), checks them against .gpu/NAME.sha256 and runs the work.
#
# Every cut is checked against the model's .sha256. `empty` first copies .gitignore's patterns into
# .git/info/exclude: the empty commit has no .gitignore, and .venv or __pycache__ left untracked would travel.
set -euo pipefail
self=$(readlink -f "$0")
cd "$(git rev-parse --show-toplevel)"

joined() {  # NAME: the staged pieces joined and checked, into .gpu/NAME.whole
  cat .gpu/"$1".part* > ".gpu/$1.whole"
  echo "$(cat ".gpu/$1.sha256")  .gpu/$1.whole" | sha256sum -c --quiet || { rm -f ".gpu/$1.whole"; exit 1; }
}

command=${1:?usage: gpu_stage.sh fit|big [NAME...] | empty | restore}
shift
names=("$@"); [ ${#names[@]} -gt 0 ] || names=(smollm2 qwen-1.5b qwen-0.5b)
case "$command" in
  fit)
    tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
    size=$(( (64 * 1048576 - tree - 2 * 1048576) / 1048576 ))
    [ "$size" -ge 4 ] || { echo "the tracked tree ($tree bytes) leaves no room for pieces" >&2; exit 1; }
    for name in "${names[@]}"; do
      [ -f ".gpu/$name.sha256" ] || { echo "$name: not staged (.gpu/$name.sha256 missing)"; continue; }
      largest=$(stat -c %s .gpu/"$name".part* | sort -n | tail -1)
      if [ "$largest" -gt $(( size * 1048576 )) ]; then
        joined "$name"
        rm .gpu/"$name".part*
        split -b "${size}M" -d -a 2 ".gpu/$name.whole" ".gpu/$name.part"
        rm ".gpu/$name.whole"
      fi
      echo "$name: $(ls .gpu/"$name".part* | wc -l) pieces of at most $(( $(stat -c %s .gpu/"$name".part* | sort -n | tail -1) / 1048576 )) MiB (tree $(( tree / 1048576 )) MiB)"
    done ;;
  big)
    mkdir -p .gpu/big
    for name in "${names[@]}"; do
      [ -f ".gpu/$name.sha256" ] || { echo "$name: not staged (.gpu/$name.sha256 missing)"; continue; }
      joined "$name"
      rm -f .gpu/big/"$name".*
      split -b 62M -d -a 2 ".gpu/$name.whole" ".gpu/big/$name."
      rm ".gpu/$name.whole"
      echo "$name: $(ls .gpu/big/"$name".* | wc -l) pieces of 62 MiB in .gpu/big (calls from an empty checkout)"
    done ;;
  empty)
    [ -z "$(git status --porcelain --untracked-files=no)" ] || { echo "error: commit or stash your changes first"; exit 1; }
    git branch --show-current > .git/gpu-stage-branch
    [ -s .git/gpu-stage-branch ] || git rev-parse HEAD > .git/gpu-stage-branch
    grep -v '^#' .gitignore | while read -r pattern; do
      if [ -n "$pattern" ] && ! grep -qxF "$pattern" .git/info/exclude; then echo "$pattern" >> .git/info/exclude; fi
    done
    [ "$self" = "$PWD/.git/gpu_stage.sh" ] || cp "$self" .git/gpu_stage.sh
    git checkout -q --detach "$(git commit-tree "$(git hash-object -t tree /dev/null)" -m 'empty tree for staging')"
    echo "checkout: an empty commit (back with: bash .git/gpu_stage.sh restore, or git checkout $(cat .git/gpu-stage-branch))"
    git status --short | head ;;
  restore)
    git checkout -q "$(cat .git/gpu-stage-branch)"
    echo "checkout: $(git branch --show-current || git rev-parse --short HEAD)" ;;
  *) echo "usage: gpu_stage.sh fit|big [NAME...] | empty | restore"; exit 2 ;;
esac
