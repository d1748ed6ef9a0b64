#!/usr/bin/env bash
# Staging large files on the lent GPU in fewer calls. Each device call carries at most 64 MiB, the project's
# tracked tree (~39 MiB: the shipped drafts, benchmark results) included, so with the tree in place a call carries
# one 23 MiB piece: the Qwen pair (1.5 GiB) took 68 piece calls. With the checkout switched to an empty commit for
# the piece calls a call carries a 62 MiB piece: 26 calls. Run here, in the project's root:
#
#   bash benchmarks/gpu_stage.sh split     # .gpu/big/q15.NN and q05.NN (62 MiB) from .gpu/qwen-*.partNN, checked
#   bash benchmarks/gpu_stage.sh empty     # the checkout -> an empty commit (refused with uncommitted changes)
#     ... the piece calls, back to back: run(command="mkdir -p /root/w && cp .gpu/big/q15.00 /root/w/",
#         carry=[".gpu/big/q15.00"]), ... (a pause of more than 30 s lets the machine go)
#   bash .git/gpu_stage.sh restore        # back to the branch before the call that runs the work (the empty
#                                          # checkout has no benchmarks/: `empty` leaves this script in .git/)
#   then the work's call: cat /root/w/q15.* > /root/w/qwen-1.5b.gguf (and q05.* > qwen-0.5b.gguf), the
#   checksums in .gpu/qwen-*.sha256, then the benchmark (gpu_session.sh qwen-triton, distill-qwen, ...)
#
# `empty` first adds the ignore patterns of .gitignore to .git/info/exclude: the empty commit has no .gitignore,
# and .venv or __pycache__ left untracked would travel with each call.
set -euo pipefail
self=$(readlink -f "$0")
cd "$(git rev-parse --show-toplevel)"
case "${1:?usage: gpu_stage.sh split|empty|restore}" in
  split)
    mkdir -p .gpu/big
    for model in 1.5b 0.5b; do
      short=q${model/./}; short=${short%b}
      ls .gpu/qwen-$model.part* > /dev/null || { echo "error: no .gpu/qwen-$model.part* (run ../shared/gpu/stage-qwen $model)"; exit 1; }
      rm -f .gpu/big/$short.*
      cat .gpu/qwen-$model.part* | split -b 62M -d -a 2 - .gpu/big/$short.
      echo "$(cat .gpu/big/$short.* | sha256sum | cut -d' ' -f1) (pieces) $(cat .gpu/qwen-$model.sha256) (expected)"
      [ "$(cat .gpu/big/$short.* | sha256sum | cut -d' ' -f1)" = "$(cat .gpu/qwen-$model.sha256)" ] \
        || { echo "error: the pieces of $model do not make the checked file"; exit 1; }
      ls .gpu/big/$short.* | tr '\n' ' '; echo
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
  *) echo "usage: gpu_stage.sh split|empty|restore"; exit 2 ;;
esac
