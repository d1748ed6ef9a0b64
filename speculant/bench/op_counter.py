"""Counting the aten ops the batched engine dispatches, those inside a static step's bodies (what a
CUDA graph replays) apart from those outside (each an eager launch on a GPU). Used by
tests/test_row_step.py and benchmarks/batch_ops.py.

    with counting_ops() as counter:
        engine.step()
    sum(counter.outside.values())   # ops outside the bodies; counter.inside: those in them
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from torch.utils._python_dispatch import TorchDispatchMode

from speculant import row_step


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched, by op, apart inside and outside a static step's bodies."""

    def __init__(self) -> None:
        super().__init__()
        self.outside, self.inside, self.in_body = Counter(), Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.inside if self.in_body else self.outside)[func] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_ops() -> Iterator[OpCounter]:
    """An OpCounter counting the block's ops, with row_step._Graph.run patched to mark its body's ops
    as inside (restored on the way out)."""
    counter = OpCounter()
    run = row_step._Graph.run

    def counted(graph, ints, uniforms):
        body = graph.body

        def inside(inputs):
            counter.in_body = True
            try:
                return body(inputs)
            finally:
                counter.in_body = False

        graph.body = inside
        try:
            return run(graph, ints, uniforms)
        finally:
            graph.body = body

    row_step._Graph.run = counted
    try:
        with counter:
            yield counter
    finally:
        row_step._Graph.run = run
