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
from speculant.distill.draft_model import FeatureDraft
from speculant.drafters.ngram import NgramDrafter
from speculant.engine import StepResult
from speculant.models.transformer import LeanModel
from speculant.sampling import SamplingParams, logits_to_probs, sample_from


def static_forward(model: LeanModel, compile: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """tokens [T], positions [T] (device tensors) -> logits [T, vocab]; attends over the whole cache.

    Compiled once per model (torch.compile fuses the elementwise ops: fewer kernels per graph) and
    memoised on the model, so every stepper over the same model shares the compiled code."""
    cached = getattr(model, "_static_forward", {})
    key = (compile, model.features is not None)  # a target that keeps features writes them too
    if key not in cached:

        def forward(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            hidden = model.hidden_states(tokens, positions, kv_len=model.max_seq_len)
            model.record_features(hidden, positions)
            return model.logits(hidden)

        # dynamic=None: the first shape compiles static, the next one once for all lengths >= 2
        cached[key] = torch.compile(forward) if compile else forward
        model._static_forward = cached
    return cached[key]


def static_feature_forward(draft: FeatureDraft, compile: bool):
    """The feature draft's forward: tokens [T], features [T, E], positions [T] -> (logits [T, V],
    predicted features [T, E]); attends over the whole cache. Memoised like static_forward."""
    cached = getattr(draft, "_static_forward", {})
    if compile not in cached:

        def forward(tokens, features, positions):
            hidden = draft.feature_hidden(tokens, features, positions, kv_len=draft.max_seq_len)
            return draft.logits(hidden), hidden

        cached[compile] = torch.compile(forward) if compile else forward
        draft._static_forward = cached
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
        self.features = isinstance(draft_model, FeatureDraft)
        if self.features:
            target.keep_features()  # before compiling: the target's forward then writes them
            self.draft_fn = static_feature_forward(draft_model, compile)
        else:
            self.draft_fn = static_forward(draft_model, compile) if draft_model is not None else None
        self.target_fn = static_forward(target, compile)
        self.graphs: dict = {}
        self.params: SamplingParams | None = None
        self.capture_time = 0.0
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # ---- request lifecycle (called by the engine) --------------------------------------------
    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        """Prefill the target (prompt[:-1]) and the draft (what its first step's window does not
        re-read); graphs are captured on first use."""
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
            self.draft_valid = 0
            self._catch_up_draft(prompt, len(prompt) - 1 if self.features else len(prompt) - 2)

    def _catch_up_draft(self, context: list[int], upto: int) -> None:
        """Make draft positions < upto valid, eagerly, if steps without drafting (γ = 0) left a gap
        the next graph's window does not cover. A token draft holds x_i at position i; a feature
        draft reads (x_{i+1}, f_i) at position i."""
        start = self.draft_valid
        if upto <= start:
            return
        if self.features:
            self.draft_model.forward_features(torch.tensor(context[start + 1 : upto + 1], device=self.device),
                                              self.target.features[start:upto], start)
        else:
            self.draft_model.forward(torch.tensor(context[start:upto], device=self.device), start)
        self.draft_valid = upto

    def step(self, context: list[int], gamma: int, generator: torch.Generator | None) -> StepResult:
        start = time.perf_counter()
        n = len(context) - 1
        if self.features and gamma > 0 and n >= 1:
            # re-read the last min(γ+1, n) draft positions with true features: every position the
            # previous step fed with predicted features lies in that window
            window = min(gamma + 1, n)
            self._catch_up_draft(context, n - window)
            key = ("features", gamma, window)
            runner = self.graphs.get(key) or self._prepare(key, self._feature_step_body(gamma, window),
                                                           {"window": window, "starts": 2, "uniforms": 2 * gamma + 1})
            runner.inputs["window"].copy_(torch.tensor(context[n - window + 1:]), non_blocking=True)
            runner.inputs["starts"].copy_(torch.tensor([n - window, n]), non_blocking=True)
            drafted = gamma
        elif self.draft_model is not None and not self.features and gamma > 0 and len(context) >= 2:
            self._catch_up_draft(context, n - 1)
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
            if drafted and self.features:  # true features for positions < n; later ones are redone
                self.draft_valid = n
            elif drafted:  # x_i at i up to n, then the accepted drafts fed while drafting
                self.draft_valid = n + 1 + min(num_accepted, drafted - 1)
            self.draft_model._length = max(self.draft_valid, n + drafted)  # an upper bound of what was written
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

    def _feature_step_body(self, gamma: int, window: int):
        params, draft_fn, target_fn, features = self.params, self.draft_fn, self.target_fn, self.target.features
        offsets = torch.arange(max(gamma, window) + 1, device=self.device)

        def body(window, starts, uniforms):
            # window [W] = x_{n-W+1..n}: draft positions n-W..n-1 read them with the true f_{n-W..n-1}
            positions = starts[0] + offsets[: window.shape[0]]
            logits, predicted = draft_fn(window, features.index_select(0, positions), positions)
            logits, feature = logits[-1], predicted[-1:]
            tokens, probs = [], []
            for i in range(gamma):
                step_probs = logits_to_probs(logits, params)
                token = sample_from(step_probs, uniforms[i])
                tokens.append(token)
                probs.append(step_probs)
                if i + 1 < gamma:  # draft position n+i reads (x̂_{n+i+1}, f̂_{n+i})
                    logits, feature = draft_fn(token.view(1), feature, starts[1] + offsets[i : i + 1])
                    logits = logits[-1]
            draft_tokens = torch.stack(tokens)  # [γ]
            target_in = torch.cat([window[-1:], draft_tokens])  # [x_n, x̂_1..x̂_γ] at n..n+γ
            target_probs = logits_to_probs(target_fn(target_in, starts[1] + offsets[: gamma + 1]), params)
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
        return [(m, m.k_cache.clone(), m.v_cache.clone(), m.features.clone() if m.features is not None else None,
                 m.length) for m in models]

    @staticmethod
    def _restore_caches(saved) -> None:
        for model, k, v, features, length in saved:
            model.k_cache.copy_(k)
            model.v_cache.copy_(v)
            if features is not None:
                model.features.copy_(features)
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
