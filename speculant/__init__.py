"""speculant: exact speculative decoding of transformer language models."""

from speculant.api import load
from speculant.sampling import SamplingParams, logits_to_probs

__all__ = ["SamplingParams", "load", "logits_to_probs"]
__version__ = "0.1.0"
