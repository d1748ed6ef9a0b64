"""Any transformers causal LM as a `CausalLM`: for architectures the lean model does not implement.

The KV cache is transformers' own (a DynamicCache that the model creates on the first call).
`truncate` only lowers the length; the next `forward` crops the cache to its start position.
A cache that cannot be cropped (a sliding-window layer past its window, in some transformers
versions) is dropped and rebuilt by re-reading the kept tokens: slower, never wrong.

    >>> import torch, transformers
    >>> config = transformers.GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=2, n_head=2)
    >>> model = HFCausalLM(transformers.GPT2LMHeadModel(config))
    >>> model.forward(torch.tensor([1, 2, 3]), 0).shape
    torch.Size([3, 50])
    >>> model.truncate(1); model.length
    1
    >>> model.prefill(torch.tensor([4, 5])); model.length
    2
"""

from __future__ import annotations

import inspect
import os

import torch

from speculant.models.base import PositionalCache


class HFCausalLM(PositionalCache):
    def __init__(self, model, max_seq_len: int | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        context = _context_length(model.config)
        if context is None:
            self.max_seq_len = max_seq_len or 2048
        else:
            self.max_seq_len = min(max_seq_len or context, context)
        self._cache = None  # transformers' cache object, holding len(self._cached_tokens) positions
        # transformers >= 5.2x names the argument and the output field `cache`, earlier `past_key_values`
        parameters = inspect.signature(model.forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        self._keeps_logits = "logits_to_keep" in parameters  # compute the head for the last positions only
        self._cached_tokens: list[int] = []
        self._length = 0

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_seq_len: int | None = None,
        **kwargs,
    ) -> HFCausalLM:
        """Load `AutoModelForCausalLM` from a local folder (kwargs go to from_pretrained)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), **dtype_kwargs(dtype), **kwargs)
        return cls(model.to(device), max_seq_len=max_seq_len)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """tokens [T] at positions start_pos.. -> logits [T, vocab] float32."""
        end = self._write_range(start_pos, tokens.shape[0])
        self._crop(start_pos)
        logits = self._run(tokens.to(self.device), start_pos)
        self._length = end
        return logits[0].float()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor) -> None:
        """Make the cache hold tokens [T] at positions 0..T-1; the output head runs for the last
        position only where the model's forward takes `logits_to_keep`."""
        self.truncate(0)
        end = self._write_range(0, tokens.shape[0])
        self._crop(0)
        if end:
            self._run(tokens.to(self.device), 0, last_logits_only=True)
        self._length = end

    def _run(self, tokens: torch.Tensor, start_pos: int, last_logits_only: bool = False) -> torch.Tensor:
        """Feed tokens [T] at start_pos == the cache's length; returns logits [1, T, vocab] (or
        [1, 1, vocab], the last position's, with last_logits_only where the model can)."""
        positions = torch.arange(start_pos, start_pos + tokens.shape[0], device=self.device)
        keep = {"logits_to_keep": 1} if last_logits_only and self._keeps_logits else {}
        out = self.model(input_ids=tokens[None], position_ids=positions[None], use_cache=True,
                         **{self._cache_name: self._cache}, **keep)
        self._cache = getattr(out, self._cache_name)
        self._cached_tokens[start_pos:] = tokens.tolist()
        return out.logits

    def _crop(self, length: int) -> None:
        """Make the transformers cache hold exactly the first `length` positions."""
        cached = len(self._cached_tokens)
        if cached <= length:
            return
        kept = self._cached_tokens[:length]
        if length > 0 and self._cache is not None:
            try:
                # negative = "remove this many": the one form transformers 4.50 .. 5.x all accept
                self._cache.crop(length - cached)
                if self._cache.get_seq_length() == length:
                    self._cached_tokens = kept
                    return
            except (RuntimeError, ValueError, AttributeError, NotImplementedError):
                pass
        self._cache, self._cached_tokens = None, []
        if kept:  # cropping was impossible: rebuild the cache from the kept tokens
            self._run(torch.tensor(kept, device=self.device), 0)


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
