"""Bit-exact mode for the generic step: the target seen through the fused step's exact forward.

A hierarchy (`--draft A --draft B`), a draft model that runs through transformers and the steps that
keep logits (logprobs) run the generic step (speculant.step.GenericStepper), which calls the target's
forward(tokens, start_pos[, ancestors]). `ExactTarget` is a CausalLM over a lean model whose every
call is the one a FusedStepper(bit_exact=True) makes (`score`): EXACT_WIDTH rows, padded, through the
shared compiled `exact_forward`, each row walking its own keys in position order
(speculant.models.exact_attention), in pieces of EXACT_WIDTH tokens for a longer chain (with
kernels="triton": the call's own rows through TritonForward.forward_exact, unpadded); its prefill
is that stepper's own (`FusedStepper.prefill`). Plain bit-exact decoding runs the same stepper, so a
position's logits are the same bits in plain decoding and in any step the generic step runs over
ExactTarget (tests/test_bit_exact_generic.py), and greedy output is plain greedy output token for
token. The drafter's own models (a hierarchy's middle levels) are not wrapped: a draft only proposes,
and the target's logits decide every emitted token.

    >>> plain = FusedStepper(target, None, bit_exact=True)                   # doctest: +SKIP
    >>> stepper = GenericStepper(ExactTarget(plain), hierarchy)              # doctest: +SKIP

Batched requests (speculant.batching.BatchEngine in bit-exact mode) keep each row's cache laid out as
the model's own (`ExactRows`) and run a row's prefill and verification through ExactTarget with that
cache swapped into the model: the same compiled forwards on tensors of the same shapes and strides as
a request decoded alone, so a request's logits, hence its greedy tokens, do not depend on its
neighbours. One row at a time: a step costs one exact forward per row instead of one for the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from speculant.fused import FusedStepper, _Runner
from speculant.models.base import check_fits
from speculant.models.exact_attention import EXACT_WIDTH


class ExactTarget:
    """A TreeCausalLM (speculant.models.base): `stepper.target`, a LeanModel, whose every forward runs
    `stepper`'s bit-exact forward. The model's cache is the one it writes; its length is kept through
    the cache-length API (set_length, truncate).

    graphs: each forward replays a CUDA graph of stepper.exact_score over static inputs (where the
    stepper uses graphs; elsewhere the same packed inputs run eagerly): one graph for every call on
    torch's kernels, whose calls are all EXACT_WIDTH rows, one per row count on the triton kernels. The
    generic step (a hierarchy) then launches one graph per verification instead of every kernel of the
    forward. The same kernels on the same inputs: the same bits. Not for ExactRows, which swaps row
    caches into the model (a graph writes the cache it was captured on)."""

    def __init__(self, stepper: FusedStepper, graphs: bool = False) -> None:
        if not stepper.bit_exact:
            raise ValueError("ExactTarget runs a bit-exact stepper's forward: FusedStepper(..., bit_exact=True)")
        self.stepper = stepper
        self.model = stepper.target
        self.vocab_size, self.max_seq_len, self.device = self.model.vocab_size, self.model.max_seq_len, self.model.device
        self.layouts: dict[bytes, tuple[torch.Tensor, ...]] = {}  # a tree's layout, by its ancestors' bytes
        self.graphs = graphs
        self.runners: dict[int, _Runner] = {}  # rows -> exact_score over one packed int buffer
        self.pool = torch.cuda.graph_pool_handle() if graphs and stepper.use_graphs else None

    @property
    def length(self) -> int:
        return self.model.length

    def truncate(self, length: int) -> None:
        self.model.truncate(length)

    def prefill(self, tokens: torch.Tensor) -> None:
        """tokens [T] -> None: the stepper's prefill (the one its plain decoding starts from)."""
        self.stepper.prefill(tokens.tolist())

    def move_slot(self, source: int | torch.Tensor, dest: int | torch.Tensor) -> None:
        self.model.move_slot(source, dest)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, ancestors: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [T] at positions start_pos.. -> logits [T, vocab] float32, as LeanModel.forward (a
        tree with `ancestors` [T, T] bool: at most EXACT_WIDTH nodes), in calls of EXACT_WIDTH rows."""
        t = tokens.shape[0]
        if start_pos > self.length:
            raise ValueError(f"gap in the cache: start_pos {start_pos} > length {self.length}")
        check_fits(self.model, start_pos + t)
        tokens = tokens.to(self.device)
        if ancestors is None:  # a chain: piece i from position start_pos + i·W reads the pieces before it
            pieces = [tokens[i:i + EXACT_WIDTH] for i in range(0, t, EXACT_WIDTH)]
            logits = torch.cat([self._score(piece, start_pos + i * EXACT_WIDTH, self._layout(piece.shape[0]))
                                for i, piece in enumerate(pieces)])
        else:
            logits = self._score(tokens, start_pos, self._layout(t, ancestors.cpu()))
        self.model.set_length(start_pos + t)
        return logits

    def _layout(self, t: int, ancestors: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The stepper's layout of a chain of t tokens or of a tree (ancestors [T, T] bool, on the host),
        made once per shape."""
        key = t if ancestors is None else ancestors.numpy().tobytes()  # T·T bytes: T is in the key too
        if key not in self.layouts:
            depths = torch.arange(t) if ancestors is None else ancestors.sum(-1) - 1
            self.layouts[key] = self.stepper.layout_of(depths, ancestors)
        return self.layouts[key]

    def _score(self, tokens: torch.Tensor, start: int, layout: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """stepper.exact_score of tokens [T] at `start` laid out by `layout` -> logits [T, V]; with graphs
        from the runner of its row count, its inputs packed into one static buffer: [tokens (padded to
        EXACT_WIDTH on torch's kernels), start, count, depths [W], nodes [W·W]]."""
        if not self.graphs:
            return self.stepper.exact_score(tokens, torch.tensor(start, device=self.device), layout)
        t = tokens.shape[0]
        rows = EXACT_WIDTH if self.stepper.kernels == "torch" else t  # torch's kernels: every call padded to W
        depths, nodes, count = layout
        packed = torch.cat([tokens, tokens.new_zeros(rows - t), tokens.new_tensor([start]), count.view(1),
                            depths, nodes.view(-1)])
        runner = self.runners.get(rows)
        if runner is None:  # built over this call's own inputs: its warm-up writes this call's keys and values
            def body(ints: torch.Tensor, _: torch.Tensor, rows: int = rows) -> torch.Tensor:
                width = EXACT_WIDTH
                depths, nodes = ints[rows + 2:rows + 2 + width], ints[rows + 2 + width:].view(width, width)
                return self.stepper.exact_score(ints[:rows], ints[rows], (depths, nodes, ints[rows + 1]))

            runner = self.runners[rows] = _Runner(body, packed, packed.new_zeros(1), self.stepper.use_graphs, self.pool,
                                                  lambda: None, lambda saved: None)
        else:
            runner.ints.copy_(packed)
        return runner.run()[:t].clone()


class ExactRows:
    """The caches of up to `rows` requests in bit-exact mode (speculant.batching), each laid out as the
    model's own: keys and values [rows, layers, S + EXACT_WIDTH, KV, D], features [rows, S +
    EXACT_WIDTH, E] (row b's slice has the model's cache's shape and strides). It stands where the
    batched engine keeps a models.transformer.RowKVCache: row drafters read `features` (a feature
    draft) and rows move with `move_row`. Each call swaps row b's cache into the model (`row`) and
    runs `target`, an ExactTarget, which must not replay graphs (on torch's kernels, the only ones it
    takes, it never does: its stepper's prefill is eager in bit-exact mode there, and its forwards are
    eager calls of the compiled function)."""

    def __init__(self, target: ExactTarget, rows: int) -> None:
        if target.stepper.kernels != "torch":  # its prefill replays graphs, which write the cache they captured
            raise ValueError("bit-exact batching runs torch's kernels, not kernels='triton': run requests one by one")
        model = target.model
        self.target, self.model = target, model
        self.k = model.k_cache.new_zeros((rows, *model.k_cache.shape))
        self.v = model.v_cache.new_zeros((rows, *model.v_cache.shape))
        self.features = model.features.new_zeros((rows, *model.features.shape))  # a bit-exact target keeps them

    @property
    def rows(self) -> int:
        return self.k.shape[0]

    def keep_features(self) -> None:
        """Features are always kept (the exact forward writes them): what a feature draft asks for."""

    def move_row(self, source: int, dest: int, length: int) -> None:
        """Copy row `source`'s first `length` slots to row `dest` (rows stay packed when one leaves)."""
        self.k[dest, :, :length] = self.k[source, :, :length]
        self.v[dest, :, :length] = self.v[source, :, :length]
        self.features[dest, :length] = self.features[source, :length]

    @contextmanager
    def row(self, b: int, length: int) -> Iterator[ExactTarget]:
        """Row b's cache (its first `length` slots valid) in the model for the calls inside; then the
        model's own cache and length again."""
        model = self.model
        own = model.k_cache, model.v_cache, model.features, model.length
        model.k_cache, model.v_cache, model.features = self.k[b], self.v[b], self.features[b]
        model.set_length(length)
        try:
            yield self.target
        finally:
            model.k_cache, model.v_cache, model.features = own[:3]
            model.set_length(own[3])

    def prefill(self, b: int, tokens: list[int]) -> None:
        """Row b's cache then holds `tokens` (a prompt but its last token), prefilled as alone."""
        with self.row(b, 0) as target:
            target.prefill(torch.tensor(tokens, dtype=torch.int64))

    def forward_rows(self, tokens: torch.Tensor, starts: list[int], lengths: list[int]) -> torch.Tensor:
        """tokens [B, T]: row b's first lengths[b] at positions starts[b].. of its own cache (valid up to
        there) -> logits [B, T, vocab] (zeros past a row's length), one exact call per row."""
        logits = torch.zeros(*tokens.shape, self.model.vocab_size, device=self.model.device)
        for b, (start, length) in enumerate(zip(starts, lengths)):
            with self.row(b, start) as target:
                logits[b, :length] = target.forward(tokens[b, :length], start)
        return logits
