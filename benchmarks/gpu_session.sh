#!/usr/bin/env bash
# The measurements that wait for a GPU, in parts of at most ~9 minutes each (one device call each).
#
# Here, once:     bash ../shared/gpu/stage-models && bash benchmarks/gpu_session.sh wheels
#                 bash benchmarks/gpu_stage.sh fit   (the shipped drafts make the tracked tree ~39 MiB: it cuts
#                 the staged pieces to what a 64 MiB call still carries, e.g. SmolLM2 in 5 pieces, not 3)
#                 The Qwen pair in 26 calls rather than 68: gpu_stage.sh big, then gpu_stage.sh empty for the piece calls
# On the device:  the staging calls of ../shared/gpu/GPU.md, one per piece (SmolLM2 at /root/w/smollm2.gguf,
#                 gguf in /root/site), then, back to back while the machine is warm, one call per part:
#                   bash benchmarks/gpu_session.sh PART          (writes JSON and logs into $OUT)
# carrying [".whl"] for the part `serve` (its wheels), nothing for the others.
# Start with ONE call (the first staging call, ending in `sleep 60` to leave time to send the rest): while
# no machine can be started every call is refused and each refusal costs device time (15 s each; on
# 2026-12-06 a batch of 49 calls sent without a machine cost 976 of the session's 1800 s).
#
# Parts, in the order they pay:
#   tests      the CUDA tests: Triton forward and fused step, bit-exact (fused, generic, batched),
#              the fused step, candidates, the captured batched step; TEST_SETTINGS= runs them under
#              triton_layers settings not yet the defaults (e.g. PDL=1,PREFETCH=4: the PDL wait's memory clobber)
#   headline   the BENCHMARKS.md headline rows on the held-out tasks (after the sampling-compile fix:
#              every row must say compiled_sampling true), torch beside triton kernels
#   tuned      the same on the tuned tasks (code = HumanEval, chat = Python topics)
#   exact      bit-exact mode against the default, every drafter (torch's kernels), 64 prompts × 256 tokens
#   exact-triton  the same on the Triton kernels (bit-exact at Triton speed: the candidate CUDA default)
#   kernels    one forward, Triton kernels against the compiled lean model (after the 32-row tile change)
#   qwen-exact bit-exact mode on the Qwen pair (the 0.5B drafting), 16 prompts × 128 tokens
#   exact-parallel  issue 21's guarantee, bit-exact mode only, 64 prompts × 256 tokens, several processes on
#              the GPU at once (their tok/s are not the mode's cost: see exact, exact-triton); EXACT_SETS
#              picks them: smollm2 (every fused drafter), smollm2-triton (the same and the hierarchy on
#              the Triton kernels), smollm2-batched (8 rows), smollm2-hierarchy (generic step), and where
#              /root/w/qwen-1.5b.gguf is staged qwen (the 0.5B as chain, K 4 + lookup 8, auto; n-gram),
#              qwen-triton (the same on the Triton kernels) and qwen-hierarchy (0.5B > n-gram, QWEN_HIER_PROMPTS prompts × 128
#              tokens: the generic step runs the 0.5B eagerly). Everything comes back in exact_parallel.tgz.
#              On 2026-12-06 (H100, two processes, 320 s) smollm2 finished; the batch and the hierarchy
#              did not. Six processes at once (sixth session) slowed each several-fold (plain SmolLM2 88
#              against 484 tok/s alone): run one or two. The hierarchy runs its draft levels eagerly (22
#              tok/s on an H100, before its middle level ran as CUDA graphs): HIER_SKIP=32 runs the set's
#              second half (the first ran 32/32). EXACT_SERIAL=1 runs the sets one after another;
#              EXACT_CONFIGS= replaces each set's configs (the rows still to run), EXACT_SKIP= skips prompts
#   hierarchy  the hierarchy (every level's forwards and step tails from CUDA graphs since 2026-12-06, untimed)
#              against its single levels, default and bit-exact modes side by side: SmolLM2, and Qwen where staged
#   distill-qwen  a feature draft for the Qwen 1.5B (int8 storage), DISTILL_STAGE=data then train, or all (SEED=: a new corpus)
#   qwen-heldout  the Qwen 1.5B's drafts on the held-out domains: α, τ, acceptance per position (draft_heldout.py)
#   decode-profile  per generated token on held-out prompts, SmolLM2: decode ms, the GPU's busy ms, kernels and the
#              largest kernels, plain decoding and the shipped draft (K 4, γ 3 and 4; PROFILE_LOOKUP=8 adds the lookup
#              branch, which runs ahead since its branch is found on the device)
#   barrier-probe  a chain of one-row GEMVs as kernels in a graph (with and without PDL) against one persistent
#              kernel with a grid barrier between them (grid_barrier_probe.py: what a persistent layer kernel would save)
#   persistent-probe  the one-launch forward against the GEMV kernels (persistent_probe.py), random weights
#   gemv-settings  the one-row GEMV forward under other triton_layers settings (PREFETCH, GEMV_BLOCK_K, ...)
#   verify-tiles  the tl.dot tiles' forward at verification widths (1, 13, 21 rows) with more GEMM programs and PDL
#   gemm-sweep the Triton GEMMs at a model's widths (GEMM_MODEL=qwen2.5-1.5b) by tile and split-K, against cuBLAS
#   qwen-kernels  the same for Qwen2.5-Coder-1.5B, the Triton forward also with more GEMM programs (GEMM_PROGRAMS=)
#              and with other triton_layers settings (KERNELS_ARGS="--settings ..."; ROPE_COLUMNS, ROPE_SPLIT,
#              GATE_UP_SPLIT, FUSE_COMBINE measured in benchmarks/results/gpu-2026-12-07k/: ROPE_SPLIT auto is the default)
#   batch-profile  where a batched step's time goes: 64 rows captured, then 1, 8, 64 rows with the layers
#              compiled (--compile): ms per step, graph replays and launches per step, dynamo's compiles,
#              the largest kernels (on 2026-12-06 copies of the KV cache were 40 % of a 64-row step: the
#              row cache's layout is fixed since, and steps read keys up to a bucket past their rows)
#   batch      the batched engine at concurrency 1, 4, 16, 64 with captured steps
#   serve      the server under the openai client at concurrency 1, 4, 16, 64 (row forwards compiled, the
#              server's default on CUDA), after the single-request reference of the same pairs (speculant.load
#              ...generate, one request at a time): c1_speedup_kept, the goal >= 0.90. Servers (SERVERS=):
#              auto with K 4 + lookup 8 (a lone request runs solo with them, the batch their chain), auto
#              always batched (+no-solo), plain
#   qwen-tune  the Qwen 1.5B's Triton forward under TUNE_SETTINGS' variants (random weights), then qwen-triton
#              with the fastest
#   qwen, qwen-triton, qwen-hf   the Qwen2.5-Coder pair (issue 18; first the staging calls that
#              ../shared/gpu/stage-qwen 1.5b and 0.5b print, /root/w/qwen-{1.5b,0.5b}.gguf): our rows on
#              torch's kernels, on Triton's, then transformers' peers (eager, assisted by the 0.5B,
#              prompt lookup, static cache + compile). Our fused steps compile one layer for all layers
#              (QWEN_COMPILE=layers, the default here; =whole for whole forwards: on 2026-12-06 the 0.5B
#              chain's whole-forward compiles had not finished its first pass after 370 s on an H200);
#              QWEN_ROWS= picks our rows, QWEN_GAMMA= their γ (e.g. auto), QWEN_BIT_EXACT= on|off their mode; every benchmark script takes
#              triton_layers settings from SPECULANT_TRITON_SETTINGS (e.g. PDL=1,PREFETCH=4; here also TRITON_SETTINGS)
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: gpu_session.sh wheels|tests|decode-profile|barrier-probe|persistent-probe|gemv-settings|verify-tiles|headline|tuned|exact|exact-triton|exact-parallel|hierarchy|distill-qwen|qwen-heldout|gemm-sweep|kernels|qwen-kernels|qwen-exact|batch-profile|batch|serve|qwen-tune|qwen|qwen-triton|qwen-hf}
out=${OUT:-out}
mkdir -p "$out"
export PYTHONPATH=$PWD:/root/site${PYTHONPATH:+:$PYTHONPATH}  # the repo: benchmarks import speculant
model=/root/w/smollm2.gguf
humaneval=.gpu/HumanEval.jsonl.gz
[ -f "$humaneval" ] || humaneval=/root/w/HumanEval.jsonl.gz
draft=speculant/embedded/smollm2-135m-draft
limit() { timeout --signal=INT "$1" "${@:2}"; }  # INT: a benchmark writes what it has

case "$part" in
  wheels)  # the server's packages for the device image (Python 3.12, no network there)
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl/serve \
      "fastapi>=0.110" "uvicorn>=0.29" "prometheus_client>=0.20" "openai>=1.40" "httpx>=0.27"
    du -sh .whl ;;
  tests)
    # one line per test (-v), so that a run its limit stops says in which test: on 2026-12-07 two runs on an H100 (PDL
    # on, PDL off) both stopped at their limits in the same one, the 179th (177 had passed, 1 was skipped; -q printed
    # no names). test_exact_triton first: its CUDA control has not run on a GPU yet
    SPECULANT_TEST_TRITON_SETTINGS=${TEST_SETTINGS:-} limit ${TESTS_LIMIT:-540} python3 -m pytest -v -p no:cacheprovider \
      tests/test_exact_triton.py tests/test_triton_layers.py tests/test_triton_fused.py tests/test_bit_exact.py \
      tests/test_bit_exact_generic.py tests/test_fused.py tests/test_candidates.py tests/test_row_step.py \
      tests/test_hierarchical.py -k "cuda or triton or exact or graph" --durations=10 2>&1 | tee "$out/cuda_tests.log" ;;
  headline|tuned)
    tasks=$([ "$part" = headline ] && echo code-heldout,chat-heldout || echo code,chat)
    limit 560 python3 benchmarks/gpu_speed.py --target "$model" --humaneval "$humaneval" \
      --draft distilled="$draft" --tasks "$tasks" --prompts 16 --gammas 3,4 --candidates 4 --lookup 0,8 \
      --auto-max-gamma 6 --no-ngram --skip-hf --max-new-tokens 128 --kernels torch,triton,triton+exact --out "$out" \
      2>&1 | tee "$out/gpu_speed_$part.log" ;;
  exact)
    limit 560 python3 benchmarks/bit_exact.py --target "$model" --humaneval "$humaneval" --prompts 64 \
      --max-new-tokens 256 --out "$out" 2>&1 | tee "$out/bit_exact.log" ;;
  exact-triton)  # torch's default mode in the same run: the reference of the 10 % rule
    limit ${EXACT_LIMIT:-560} python3 benchmarks/bit_exact.py --target "$model" --humaneval "$humaneval" --prompts ${EXACT_PROMPTS:-64} \
      --max-new-tokens 256 --kernels torch,triton --configs plain,features,features#k4,features#k4#lookup8 \
      --out "$out" 2>&1 | tee "$out/bit_exact_triton.log" ;;
  qwen-exact)  # issue 21 on the Qwen pair: bit-exact against the default mode, the 0.5B as the draft
    limit ${QWEN_LIMIT:-560} python3 benchmarks/bit_exact.py --target /root/w/qwen-1.5b.gguf --draft-model /root/w/qwen-0.5b.gguf \
      --humaneval "$humaneval" --prompts ${QWEN_EXACT_PROMPTS:-16} --max-new-tokens 128 --compile layers \
      --configs ${QWEN_EXACT_CONFIGS:-plain,model,model#k4,model#auto,ngram} --checks 2 ${QWEN_EXACT_ARGS:-} \
      --out "$out" 2>&1 | tee "$out/bit_exact_qwen.log" ;;
  exact-parallel)  # EXACT_SETS: which processes (default all; the qwen ones need /root/w/qwen-*.gguf)
    sets=${EXACT_SETS:-smollm2 smollm2-batched smollm2-hierarchy qwen qwen-hierarchy}
    exact() {  # set name, target, the rest of bit_exact.py's arguments: one process in the background
      mkdir -p "$out/$1"
      limit ${EXACT_LIMIT:-540} python3 benchmarks/bit_exact.py --target "$2" --humaneval "$humaneval" \
        --modes bit-exact --out "$out/$1" "${@:3}" ${EXACT_CONFIGS:+--configs "$EXACT_CONFIGS"} \
        ${EXACT_SKIP:+--skip-prompts "$EXACT_SKIP"} > "$out/$1/bit_exact.log" 2>&1 &
      dirs+=("$1")
      [ -z "${EXACT_SERIAL:-}" ] || wait || true  # EXACT_SERIAL=1: one set after another, each its limit
    }
    dirs=()
    # convert each staged GGUF once, before the processes that load it start at once (each would convert it)
    for gguf in $model /root/w/qwen-1.5b.gguf /root/w/qwen-0.5b.gguf; do
      [ -f "$gguf" ] && python3 -c "import speculant, sys; speculant.load(sys.argv[1], draft='none', max_seq_len=64)" "$gguf"
    done
    qwen=(/root/w/qwen-1.5b.gguf --draft-model /root/w/qwen-0.5b.gguf --compile layers)
    for set in $sets; do
      case "$set" in
        smollm2) exact smollm2 "$model" --prompts 64 --max-new-tokens 256 \
                   --configs plain,features,features#k4,features#k4#lookup8,features#auto,ngram ;;
        smollm2-triton) exact smollm2-triton "$model" --kernels triton --prompts 64 --max-new-tokens 256 \
                   --configs plain,features,features#k4,features#k4#lookup8,features#auto,ngram,hierarchy --checks 4 ;;
        smollm2-batched) exact smollm2-batched "$model" --prompts 64 --max-new-tokens 256 \
                   --configs plain,features#batched8 --checks 0 ;;
        smollm2-hierarchy) exact smollm2-hierarchy "$model" --prompts 64 --max-new-tokens 256 \
                   --configs plain,hierarchy --checks 0 --skip-prompts ${HIER_SKIP:-0} ;;
        qwen) [ -f /root/w/qwen-1.5b.gguf ] && exact qwen "${qwen[@]}" --prompts 64 --max-new-tokens 256 \
                   --configs plain,model,model#k4#lookup8,model#auto,ngram --checks 2 ;;
        qwen-triton) [ -f /root/w/qwen-1.5b.gguf ] && exact qwen-triton "${qwen[@]}" --kernels triton --prompts 64 \
                   --max-new-tokens 256 --configs plain,model,model#k4#lookup8,model#auto,ngram --checks 2 ;;
        qwen-hierarchy) [ -f /root/w/qwen-1.5b.gguf ] && exact qwen-hierarchy "${qwen[@]}" \
                   --prompts ${QWEN_HIER_PROMPTS:-8} --max-new-tokens ${QWEN_HIER_TOKENS:-128} --configs "plain,model>ngram" --checks 0 ;;
        *) echo "unknown set $set" >&2; exit 2 ;;
      esac
    done
    wait || true
    for d in "${dirs[@]}"; do echo "== $d"; grep -v "^$" "$out/$d/bit_exact.log" | tail -14; done
    tar czf "$out/exact_parallel.tgz" -C "$out" "${dirs[@]}" && rm -rf "${dirs[@]/#/$out/}" ;;
  hierarchy)  # issue 18 (issue 7's goal): the hierarchy, its levels and their tails from CUDA graphs, against its
    # single levels, in the default and the bit-exact mode, in one process per target: SmolLM2 (layers:8 > ngram
    # against the feature draft and n-gram), and the Qwen pair where staged (0.5B > ngram against the 0.5B and n-gram)
    [ ! -f "$model" ] || limit ${HIER_LIMIT:-260} python3 benchmarks/bit_exact.py --target "$model" --humaneval "$humaneval" \
      --prompts ${HIER_PROMPTS:-16} --max-new-tokens 256 --configs plain,features,ngram,hierarchy --checks 0 \
      --out "$out/hierarchy_smollm2" 2>&1 | tee "$out/hierarchy_smollm2.log"
    [ ! -f /root/w/qwen-1.5b.gguf ] || limit ${HIER_LIMIT:-260} python3 benchmarks/bit_exact.py \
      --target /root/w/qwen-1.5b.gguf --draft-model /root/w/qwen-0.5b.gguf --compile layers --humaneval "$humaneval" \
      --prompts ${HIER_PROMPTS:-16} --max-new-tokens 256 --configs "plain,model,ngram,model>ngram" --checks 0 \
      --out "$out/hierarchy_qwen" 2>&1 | tee "$out/hierarchy_qwen.log" ;;
  distill-qwen)  # issue 18/23: a feature draft for the Qwen 1.5B (/root/w/qwen-1.5b.gguf staged), int8 storage so that
    # it fits the shipped drafts' 30 MB with SmolLM2's (1 layer, MLP 1536 wide, 32,768 kept ids: 17.7 MB; the flags ran
    # end to end on the CPU, 2026-12-06, eighth session). Two calls on the same warm machine (the corpus stays in
    # /root/qgen): DISTILL_STAGE=data (the 1.5B's own chat answers + code and docs), then DISTILL_STAGE=train
    # (TIME_LIMIT seconds; the draft comes back in pieces in $OUT/qwen-draft: cat them); or DISTILL_STAGE=all, both in one call.
    send_draft() {  # a file over 16 MiB does not come back from the device: pieces, joined here with cat
      mkdir -p "$out/qwen-draft" && cp /root/qdraft/config.json "$out/qwen-draft/"
      split -b 15M -d /root/qdraft/model.safetensors "$out/qwen-draft/model.safetensors.part"
      sha256sum /root/qdraft/model.safetensors | tee "$out/qwen-draft/model.safetensors.sha256"
    }
    common=(--target /root/w/qwen-1.5b.gguf --inputs features --layers 1 --intermediate-size 1536 --vocab 32768
            --save-dtype int8 --batch-size 16 --seq-len 1024 --humaneval-file "$humaneval" --device cuda --no-progress
            --seed ${SEED:-0})  # SEED: another corpus (chat prompts, answers, text) than an earlier run's
    # EAGLE-3's low, middle and high layers mixed in through 512 dimensions (3.1 MB more in int8: 20.9 MB in
    # all, 29.5 MB with SmolLM2's draft); FEATURE_LAYERS= (empty) for a draft of the final features alone
    layers=${FEATURE_LAYERS-auto}
    [ -z "$layers" ] || common+=(--feature-layers "$layers" --feature-rank ${FEATURE_RANK:-512})
    # INIT_FROM=DIR: go on from a draft (e.g. the shipped speculant/embedded/qwen2.5-coder-1.5b-draft, 650 s on an
    # H100 in two runs: it is in the tree, so every call carries it)
    [ -z "${INIT_FROM:-}" ] || common+=(--init-from "$INIT_FROM" --init-vocab ${INIT_VOCAB:-draft})
    # CHAT_PROMPTS (the data and all stages): broad (default: half everyday questions the target writes when asked, a
    # fifth of them in other languages), wide (programming only: the shipped draft's two runs) or pydoc
    chat=(--chat-prompts ${CHAT_PROMPTS:-broad})
    heldout_after() {  # AFTER=1: the new draft's α and τ per held-out domain in the same call (TRAIN_LIMIT + AFTER_LIMIT
      # must stay within the call's 600 s)
      [ -z "${AFTER:-}" ] || limit ${AFTER_LIMIT:-120} python3 benchmarks/draft_heldout.py --device cuda \
        --dtype bfloat16 --target /root/w/qwen-1.5b.gguf --draft /root/qdraft --compile layers --prompts ${AFTER_PROMPTS:-6} \
        --max-new-tokens 128 --domains ${AFTER_DOMAINS:-chat,chat_languages,math,code} --out "$out/heldout_qdraft" \
        2>&1 | { grep -v '^{' || true; } | tee "$out/draft_heldout_qdraft.log" || echo "held-out run stopped ($?)"
    }
    case ${DISTILL_STAGE:-data} in
      data) limit 560 python3 -m speculant.distill.cli "${common[@]}" "${chat[@]}" --out /root/qgen --steps 0 --engine-prompts 0 \
              --train-tokens ${TRAIN_TOKENS:-8000000} --chat-samples ${CHAT_SAMPLES:-4000} --chat-repeat 2 \
              --chat-batch-size 512 --chat-max-new-tokens 256 2>&1 | tee "$out/distill_qwen_data.log" ;;
      # a run stopped by its limit keeps its checkpoint in /root/qdraft: the same command again resumes it
      train) limit ${TRAIN_LIMIT:-570} python3 -m speculant.distill.cli "${common[@]}" --data /root/qgen/corpus.safetensors \
              --out /root/qdraft --time-limit ${TIME_LIMIT:-420} --steps 100000 --lr ${LR:-1e-3} --checkpoint-every 500 \
              --engine-prompts 0 2>&1 | tee "$out/distill_qwen_train.log" || echo "distill stopped ($?)"
             [ -f /root/qdraft/model.safetensors ] || exit 1
             send_draft; heldout_after ;;
      all)  # both in one call (one load, one conversion) when device time is short: a smaller corpus, less training
        limit ${TRAIN_LIMIT:-590} python3 -m speculant.distill.cli "${common[@]}" "${chat[@]}" --out /root/qdraft \
          --train-tokens ${TRAIN_TOKENS:-4000000} --chat-samples ${CHAT_SAMPLES:-1500} --chat-repeat 2 \
          --chat-batch-size 512 --chat-max-new-tokens 256 --time-limit ${TIME_LIMIT:-300} --steps 100000 --lr ${LR:-1e-3} \
          --checkpoint-every 500 --engine-prompts 0 2>&1 | tee "$out/distill_qwen_all.log" || echo "distill stopped ($?)"
        [ -f /root/qdraft/model.safetensors ] || exit 1
        send_draft; heldout_after ;;
      *) echo "unknown DISTILL_STAGE" >&2; exit 2 ;;
    esac ;;
  qwen-heldout)  # issue 23 for the 1.5B: α, τ and per-position acceptance per held-out domain (benchmarks/prompts/,
    # no training source), γ 4 chain, T 0 and 1, for each draft in QWEN_HELDOUT_DRAFTS (default: the shipped feature
    # draft, a freshly distilled /root/qdraft and the 0.5B where they are there)
    drafts=${QWEN_HELDOUT_DRAFTS:-speculant/embedded/qwen2.5-coder-1.5b-draft $( [ ! -f /root/qdraft/model.safetensors ] || echo /root/qdraft) $( [ ! -f /root/w/qwen-0.5b.gguf ] || echo /root/w/qwen-0.5b.gguf)}
    for d in $drafts; do
      name=$(basename "$d" .gguf)
      limit ${HELDOUT_LIMIT:-200} python3 benchmarks/draft_heldout.py --device cuda --dtype bfloat16 --target /root/w/qwen-1.5b.gguf \
        --draft "$d" --compile layers --prompts ${HELDOUT_PROMPTS:-8} --max-new-tokens 128 --out "$out/heldout_$name" \
        2>&1 | { grep -v '^{' || true; } | tee "$out/draft_heldout_$name.log" || echo "draft $d: stopped ($?)"
    done ;;
  decode-profile)  # where a token's time goes end to end on held-out prompts (decode_profile.py): plain decoding
    # and the shipped draft's rows, on the Triton kernels (PROFILE_ARGS: e.g. --kernels torch,triton)
    limit ${PROFILE_LIMIT:-400} python3 benchmarks/decode_profile.py --target "$model" --chunks 4 --draft "$draft" \
      --gammas 3,4 --candidates 4 --lookup ${PROFILE_LOOKUP:-0} ${PROFILE_ARGS:-} --out "$out" 2>&1 | tee "$out/decode_profile.log" ;;
  barrier-probe)  # a phase boundary in one persistent kernel against a kernel boundary in a graph (random weights)
    for shape in "576 64" "1536 56"; do set -- $shape
      limit ${PROBE_LIMIT:-120} python3 benchmarks/grid_barrier_probe.py --width $1 --phases $2 --programs "${PROBE_PROGRAMS:-}" \
        --out "$out/barrier_$1" 2>&1 | tee "$out/grid_barrier_probe_$1.log"
    done ;;
  persistent-probe)  # the one-launch forward (persistent_forward) against the GEMV kernels, random weights; on
    # 2026-12-07 an H100 ran SmolLM2's at 1.305 ms against 0.763 (PROBE_VARIANTS: ';'-separated settings)
    limit ${PROBE_LIMIT:-300} python3 benchmarks/persistent_probe.py --shapes ${PROBE_SHAPES:-smollm2-135m,qwen2.5-1.5b} \
      --variants "${PROBE_VARIANTS:-POLL=load;PREFETCH=1;BLOCK_K=1024;POLL=load,PREFETCH=1,BLOCK_K=1024;PROGRAMS_PER_SM=2;WARPS=4}" --out "$out" 2>&1 \
      | tee "$out/persistent_probe.log" ;;
  gemv-settings)  # the one-row GEMV forward's settings on random weights of both models' shapes (one-row forwards:
    # plain decoding's; 0.775 and 1.744 ms with the defaults on 2026-12-07): the weights' L2 prefetch before the PDL
    # wait, wider K blocks (fewer dependent loads a program for K 576), warps, rows a program (GEMV_SETTINGS)
    for shape in smollm2-135m qwen2.5-1.5b; do
      limit ${SETTINGS_LIMIT:-200} python3 benchmarks/triton_layers_gpu.py --random $shape --no-truth --no-compile \
        --prompts 1 --repeats 100 --rows 1 --split-k "" --settings "${GEMV_SETTINGS:-PREFETCH=2;PREFETCH=4;GEMV_BLOCK_K=512;GEMV_BLOCK_K=1024;GEMV_BLOCK_K=512,PREFETCH=2;GEMV_WARPS=8;GEMV_BLOCK_N=8}" \
        --out "$out/gemv_$shape" 2>&1 | tee "$out/gemv_settings_$shape.log"
    done ;;
  verify-tiles)  # the tl.dot tiles' forward (verification's, bit-exact mode's) at a speculative step's widths, random
    # weights of both models: more GEMM programs (narrower column tiles: SmolLM2's gate/up runs 48 programs of 64
    # columns by default, where its GEMV runs 192 of 16) and PDL on every launch (TILE_SETTINGS)
    for shape in smollm2-135m qwen2.5-1.5b; do
      limit ${SETTINGS_LIMIT:-200} python3 benchmarks/triton_layers_gpu.py --random $shape --no-truth --no-compile \
        --prompts 1 --repeats 100 --rows ${TILE_ROWS:-1,13,21} --split-k "" --settings "${TILE_SETTINGS:-GEMV=0;GEMM_PROGRAMS=128;GEMM_PROGRAMS=256;PDL=1;PDL=1,GEMM_PROGRAMS=256}" \
        --out "$out/tiles_$shape" 2>&1 | tee "$out/verify_tiles_$shape.log"
    done ;;
  gemm-sweep)
    limit ${SWEEP_LIMIT:-400} python3 benchmarks/triton_gemm_sweep.py --model ${GEMM_MODEL:-qwen2.5-1.5b} ${SWEEP_ARGS:-} \
      --budget $(( ${SWEEP_LIMIT:-400} - 60 )) --out "$out" 2>&1 | tee "$out/triton_gemm_sweep_${GEMM_MODEL:-qwen2.5-1.5b}.log" ;;
  kernels)
    limit ${KERNELS_LIMIT:-560} python3 benchmarks/triton_layers_gpu.py --model "$model" --split-k off ${KERNELS_ARGS:-} --out "$out" \
      2>&1 | tee "$out/triton_layers.log" ;;
  qwen-kernels)  # the 1.5B's forward on Triton's kernels (2.12 ms against torch's 4.41 ms in a graph on 2026-12-07)
    limit ${KERNELS_LIMIT:-560} python3 benchmarks/triton_layers_gpu.py --model /root/w/qwen-1.5b.gguf --no-truth --prompts 2 \
      --gemm-programs ${GEMM_PROGRAMS:-128} --split-k off ${KERNELS_ARGS:-} --out "$out" 2>&1 | tee "$out/triton_layers_qwen.log" ;;
  batch-profile)  # PROFILE_GRAPHS=0: only the compiled steps; PROFILE_ROWS: their row counts (1,8,64)
    [ "${PROFILE_GRAPHS:-1}" = 0 ] || limit 200 python3 benchmarks/batch_profile.py --device cuda --target "$model" --draft "$draft" --rows 64 \
      --gamma 4 --graphs 2>&1 | tee "$out/batch_profile_graphs.log"
    OUT="$out/compiled" limit 260 python3 benchmarks/batch_profile.py --device cuda --target "$model" --draft "$draft" \
      --rows ${PROFILE_ROWS:-1,8,64} --gamma 4 --graphs --compile 2>&1 | tee "$out/batch_profile_compiled.log" ;;
  batch)
    limit 560 python3 benchmarks/batch_throughput.py --device cuda --target "$model" --draft "$draft" \
      --dtype bfloat16 --max-new-tokens 128 --max-seq-len 1024 --graphs 2>&1 | tee "$out/batch_throughput.log" ;;
  serve)
    if [ -d .whl/serve ]; then python3 -m pip install -q --no-index --no-deps --target /root/site .whl/serve/*.whl; fi
    limit ${SERVE_LIMIT:-560} python3 benchmarks/serve_load.py --target "$model" --device cuda --dtype bfloat16 \
      --servers ${SERVERS:-default@auto+candidates=4+lookup=8,default@auto+no-solo,none} --concurrency 1,4,16,64 \
      --max-tokens 128 ${SERVE_ARGS:-} 2>&1 | tee "$out/serve_load.log" ;;
  qwen-tune)  # the Triton forward at Qwen2.5-1.5B's shapes (random weights) under each of TUNE_SETTINGS, then
    # qwen-triton with the fastest of them and the defaults (T = 1 and 5 summed) as TRITON_SETTINGS; give it only
    # settings the CUDA tests passed under (tests with TEST_SETTINGS)
    limit ${TUNE_LIMIT:-200} python3 benchmarks/triton_layers_gpu.py --random qwen2.5-1.5b --no-truth --no-compile \
      --prompts 1 --repeats 100 --rows 1,5 --split-k "" --settings "${TUNE_SETTINGS:-PDL=1;PDL=1,PREFETCH=4}" \
      --out "$out/qwen_forward" 2>&1 | { grep -v '^{' || true; } | tee "$out/triton_layers_qwen_random.log"
    TRITON_SETTINGS=$(python3 - "$out/qwen_forward/triton_layers_gpu.json" <<'PICK' || true
import json, sys
total = {}
for row in json.load(open(sys.argv[1]))["rows"]:
    if row["impl"].startswith("triton graph"):
        total[row["impl"]] = total.get(row["impl"], 0.0) + row["ms_per_forward"]
print(min(total, key=total.get).partition(", ")[2].replace(", ", ","))
PICK
)
    echo "qwen-tune: the fastest settings: ${TRITON_SETTINGS:-the defaults}" | tee "$out/qwen_tune.txt"
    TRITON_SETTINGS=$TRITON_SETTINGS exec bash "$0" qwen-triton ;;
  qwen|qwen-triton|qwen-hf)
    kernels=$([ "$part" = qwen-triton ] && echo triton || echo torch)
    groups=${QWEN_GROUPS:-$([ "$part" = qwen-hf ] && echo hf,compile || echo ours)}  # QWEN_GROUPS=ours,hf: one run
    SPECULANT_TRITON_SETTINGS=${TRITON_SETTINGS:-${SPECULANT_TRITON_SETTINGS:-}} limit ${QWEN_LIMIT:-560} python3 benchmarks/qwen_pair.py --device cuda --target-path /root/w/qwen-1.5b.gguf \
      --draft-path /root/w/qwen-0.5b.gguf --code-prompts 4 --chat-prompts 4 --humaneval-file "$humaneval" \
      --groups "$groups" --kernels "$kernels" --fused-compile ${QWEN_COMPILE:-layers} ${QWEN_GAMMA:+--gamma $QWEN_GAMMA} \
      --bit-exact ${QWEN_BIT_EXACT:-default} \
      --feature-draft ${QWEN_FEATURES:-speculant/embedded/qwen2.5-coder-1.5b-draft} \
      --rows "${QWEN_ROWS:-ours plain,ours features chain,ours features tree + lookup,ours 0.5B chain,ours 0.5B tree + lookup,ours ngram}" \
      2>&1 | tee "$out/qwen_pair_$part.log" ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
