"""The fused step: a whole speculative step as one static-shape function, captured as a CUDA graph.

On the lent H100 an eager kernel launch costs ~22 µs and a kernel inside a CUDA graph ~3 µs, so
the generic loop (one Python call per op) is launch-bound. Here each step is ONE graph replay:

    draft γ tokens with the draft model (sampling inside, from pre-drawn uniforms)
    -> one target forward over the γ+1 positions -> logits_to_probs -> acceptance.verify
    -> out = [num_accepted, next_token, x_1..x_γ]

and ONE device->host read of `out` (the step's only synchronisation). The KV caches are written in
place at positions held in device tensors; attention spans the whole static cache under a mask
built from those positions, so every step of a given γ has the same shapes and replays the same
graph. The functions are the same `logits_to_probs`, `sample_from` and `verify` as the generic
path: exactness carries over, and on the CPU the same bodies run eagerly (that is how the tests
check them).

Graphs are keyed by (kind, γ) and captured on first use for a given `SamplingParams`; they are
reused across requests. `capture_time` reports what capture (and compilation) cost.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from speculant.acceptance import verify
from speculant.drafters.ngram import NgramDrafter
from speculant.engine import StepResult
from speculant.models.transformer import LeanModel
from speculant.sampling import SamplingParams, logits_to_probs, sample_from


def static_forward(model: LeanModel, compile: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """tokens [T], positions [T] (device tensors) -> logits [T, vocab]; attends over the whole cache.

    Compiled once per model (torch.compile fuses the elementwise ops: fewer kernels per graph) and
    memoised on the model, so every stepper over the same model shares the compiled code."""
    cached = getattr(model, "_static_forward", {})
    if compile not in cached:

        def forward(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return model.logits(model.hidden_states(tokens, positions, kv_len=model.max_seq_len))

        # dynamic=None: the first shape compiles static, the next one once for all lengths >= 2
        cached[compile] = torch.compile(forward) if compile else forward
        model._static_forward = cached
    return cached[compile]


class FusedStepper:
    """Runs speculative steps for a lean target and a lean draft model, an n-gram drafter or none.

    Use through `engine.generate(..., stepper=FusedStepper(...))`. `draft_model` None means the
    drafter is deterministic (n-gram lookup) or absent (plain decoding).
    """

    def __init__(self, target: LeanModel, draft_model: LeanModel | None = None,
                 ngram: NgramDrafter | None = None, compile: bool = True, use_graphs: bool | None = None) -> None:
        self.target = target
        self.draft_model = draft_model
        self.ngram = ngram
        self.device = target.device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if compile:  # room for the shape variants (length 1 is always specialised by dynamo)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.target_fn = static_forward(target, compile)
        self.draft_fn = static_forward(draft_model, compile) if draft_model is not None else None
        self.graphs: dict = {}
        self.params: SamplingParams | None = None
        self.capture_time = 0.0
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # ---- request lifecycle (called by the engine) --------------------------------------------
    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        """Prefill target (prompt[:-1]) and draft (prompt[:-2]) caches; capture graphs if needed."""
        if params != self.params:
            # sampling params are baked into the graphs: recapture, in a fresh memory pool (a pool
            # whose graphs were freed cannot take a new capture)
            self.graphs.clear()
            self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
            self.params = params
        self.target.truncate(0)
        if len(prompt) > 1:
            self.target.forward(torch.tensor(prompt[:-1], device=self.device), 0)
        if self.draft_model is not None:
            self.draft_model.truncate(0)
            if len(prompt) > 2:
                self.draft_model.forward(torch.tensor(prompt[:-2], device=self.device), 0)

    def step(self, context: list[int], gamma: int, generator: torch.Generator | None) -> StepResult:
        start = time.perf_counter()
        if self.draft_model is not None and gamma > 0 and len(context) >= 2:
            key = ("model", gamma)
            runner = self.graphs.get(key) or self._prepare(key, self._model_step_body(gamma),
                                                           {"last2": 2, "starts": 2, "uniforms": 2 * gamma + 1})
            runner.inputs["last2"].copy_(torch.tensor(context[-2:]), non_blocking=True)
            runner.inputs["starts"].copy_(torch.tensor([len(context) - 2, len(context) - 1]), non_blocking=True)
            drafted = gamma
        else:
            draft = self.ngram.propose(context, gamma, None, None).tokens.tolist() if (self.ngram and gamma) else []
            drafted = len(draft)
            key = ("verify", drafted)
            runner = self.graphs.get(key) or self._prepare(key, self._verify_body(drafted),
                                                           {"tokens": drafted + 1, "starts": 1, "uniforms": drafted + 1})
            runner.inputs["tokens"].copy_(torch.tensor(context[-1:] + draft), non_blocking=True)
            runner.inputs["starts"].copy_(torch.tensor([len(context) - 1]), non_blocking=True)
        uniforms = runner.inputs["uniforms"]
        uniforms.copy_(torch.rand(uniforms.shape, generator=generator, device=self.device))
        out = runner.run().tolist()  # the step's one synchronisation
        num_accepted, next_token, draft_tokens = out[0], out[1], out[2:]
        self.target._length = len(context) + num_accepted  # cache: context + accepted drafts
        if self.draft_model is not None:
            self.draft_model._length = len(context) - 1 + max(drafted - 1, 0)
        elapsed = time.perf_counter() - start
        tokens = draft_tokens[:num_accepted] + [next_token]
        # time is not split between draft and target inside one graph; it is reported as target time
        return StepResult(tokens, drafted, num_accepted, None, 0.0, elapsed)

    # ---- graph bodies --------------------------------------------------------------------------
    def _model_step_body(self, gamma: int):
        params, draft_fn, target_fn = self.params, self.draft_fn, self.target_fn
        offsets = torch.arange(gamma + 1, device=self.device)

        def body(last2, starts, uniforms):
            # draft: feed the last two committed tokens (re-feeding one is harmless), then γ-1 drafts
            logits = draft_fn(last2, starts[0] + offsets[:2])[-1]
            tokens, probs = [], []
            for i in range(gamma):
                step_probs = logits_to_probs(logits, params)
                token = sample_from(step_probs, uniforms[i])
                tokens.append(token)
                probs.append(step_probs)
                if i + 1 < gamma:
                    logits = draft_fn(token.view(1), starts[0] + 2 + offsets[i : i + 1])[-1]
            draft_tokens = torch.stack(tokens)  # [γ]
            target_in = torch.cat([last2[1:], draft_tokens])  # [γ+1]
            target_probs = logits_to_probs(target_fn(target_in, starts[1] + offsets), params)
            verdict = verify(draft_tokens, torch.stack(probs), target_probs,
                             uniforms[gamma : 2 * gamma], uniforms[2 * gamma])
            return torch.cat([verdict.num_accepted.view(1), verdict.next_token.view(1), draft_tokens])

        return body

    def _verify_body(self, drafted: int):
        params, target_fn = self.params, self.target_fn
        offsets = torch.arange(drafted + 1, device=self.device)

        def body(tokens, starts, uniforms):
            target_probs = logits_to_probs(target_fn(tokens, starts[0] + offsets), params)
            verdict = verify(tokens[1:], None, target_probs, uniforms[:drafted], uniforms[drafted])
            return torch.cat([verdict.num_accepted.view(1), verdict.next_token.view(1), tokens[1:]])

        return body

    def _prepare(self, key, body, sizes: dict) -> "_Runner":
        start = time.perf_counter()
        inputs = {
            name: torch.zeros(size, dtype=torch.float32 if name == "uniforms" else torch.int64, device=self.device)
            for name, size in sizes.items()
        }
        runner = _Runner(body, inputs, self.use_graphs, self.pool, self._save_caches, self._restore_caches)
        self.graphs[key] = runner
        self.capture_time += time.perf_counter() - start
        return runner

    # Warm-up and capture run the body on dummy inputs, which writes K/V at low positions: save
    # and restore the caches' live prefix around them.
    def _save_caches(self):
        models = [m for m in (self.target, self.draft_model) if m is not None]
        return [(m, m.k_cache.clone(), m.v_cache.clone(), m.length) for m in models]

    @staticmethod
    def _restore_caches(saved) -> None:
        for model, k, v, length in saved:
            model.k_cache.copy_(k)
            model.v_cache.copy_(v)
            model._length = length


class _Runner:
    """A body with static input buffers; on CUDA captured once as a graph and replayed."""

    def __init__(self, body, inputs: dict, use_graphs: bool, pool, save, restore) -> None:
        self.body, self.inputs = body, inputs
        self.graph = None
        if use_graphs:
            saved = save()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # warm-up: compile, autotune, allocate outside the capture
                    body(**inputs)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool), torch.inference_mode():
                self.output = body(**inputs)
            restore(saved)

    def run(self) -> torch.Tensor:
        if self.graph is None:
            with torch.inference_mode():
                return self.body(**self.inputs)
        self.graph.replay()
        return self.output
