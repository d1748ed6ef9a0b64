"""Memory of what a benchmark runs: parameter and KV-cache bytes of a target and its drafts (shared
tensors counted once, the int8 copy's matrices included), and CUDA's allocated / peak bytes."""

from __future__ import annotations

import gc

import torch

from speculant.bench.peers import param_bytes


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def allocated_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None


def _models_of(spec) -> list:
    """The CausalLMs a Speculant runs: the target's, then each drafter level's."""
    models = [spec.target.model]
    for _, drafter in getattr(spec, "levels", []):
        model = getattr(drafter, "model", None)
        if model is not None:
            models.append(model)
    return models


def _int8_bytes(module: torch.nn.Module, seen: set, param_storages: set[int]) -> int:
    """Bytes of the Int8Matrix weights (the `int8` drafter's) a module holds, not parameters; each
    one's float source (Int8Matrix.source) counts only where it is no parameter's storage (a model
    loaded as NAME:int8 keeps its float matrices for prompts; `int8` shares the target's)."""
    from speculant.models.transformer import Int8Matrix

    total = 0
    for sub in module.modules():
        for value in vars(sub).values():
            for item in value if isinstance(value, tuple) else (value,):
                if not isinstance(item, Int8Matrix):
                    continue
                for tensor in (item.q, item.scale):
                    key = (tensor.data_ptr(), tensor.nbytes)
                    if key not in seen:
                        seen.add(key)
                        total += tensor.nbytes
                storage = item.source.untyped_storage()
                key = ("storage", storage.data_ptr())
                if storage.data_ptr() not in param_storages and key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
    return total


def memory_of(spec, max_positions: int) -> dict:
    """Parameter and KV-cache bytes of target + drafts (shared tensors counted once).

    kv_bytes_allocated: the static caches as allocated (max_seq_len positions);
    kv_bytes_used: what `max_positions` positions of every cache occupy."""
    seen: set = set()
    params = kv_alloc = kv_used = 0

    weights = getattr(spec.target, "weights", None)
    modules = [weights] if isinstance(weights, torch.nn.Module) else []
    modules += [v for model in _models_of(spec) for v in vars(model).values() if isinstance(v, torch.nn.Module)]
    param_storages = {p.untyped_storage().data_ptr() for module in modules for p in module.parameters()}
    if isinstance(weights, torch.nn.Module):
        params += param_bytes(weights, seen)
    for model in _models_of(spec):
        for name, value in vars(model).items():
            if isinstance(value, torch.nn.Module):
                params += param_bytes(value, seen) + _int8_bytes(value, seen, param_storages)
            elif isinstance(value, torch.Tensor) and "cache" in name:
                key = (value.data_ptr(), value.nbytes)
                if key in seen:
                    continue
                seen.add(key)
                kv_alloc += value.nbytes
                capacity = getattr(model, "max_seq_len", 0)
                if value.dim() >= 2 and capacity and value.shape[1] == capacity:
                    kv_used += value.nbytes * min(max_positions, capacity) // capacity
                else:
                    kv_used += value.nbytes
    return {"param_bytes": params, "kv_bytes_allocated": kv_alloc, "kv_bytes_used": kv_used,
            "total_bytes": params + kv_alloc}
