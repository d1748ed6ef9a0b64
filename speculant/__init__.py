"""speculant: exact speculative decoding of transformer language models."""

__all__ = ["SamplingParams", "load", "logits_to_probs"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use, so that `speculant --version` or an early Ctrl-C does not wait for torch.
    if name == "load":
        from speculant.api import load

        return load
    if name in ("SamplingParams", "logits_to_probs"):
        import speculant.sampling as sampling  # noqa: PLR0402  (a lazy attribute of the package itself)

        return getattr(sampling, name)
    raise AttributeError(f"module 'speculant' has no attribute {name!r}")
