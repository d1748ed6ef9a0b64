"""Test-wide settings. One intra-op thread: the unit tests run thousands of tiny tensor ops, for
which thread hand-offs cost far more than the arithmetic (25x slower under CPU contention)."""

import torch

torch.set_num_threads(1)
