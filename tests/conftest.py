"""Shared tools for the exactness tests: an independent sampling transform, a chi-square test
with an honest power estimate, and the exact law of a (possibly broken) speculative sampler.

Everything here is plain numpy / float64 and deliberately written without calling speculant, so
that the laws the tests compare against are not computed by the code under test.

Also the Triton tests' device: pytest imports this file before any test module, so it is where
TRITON_INTERPRET=1 is set (triton reads it when it is imported) on a machine whose torch sees no GPU.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch
from scipy import stats

# Triton reads TRITON_INTERPRET when it is imported: set it first, where no GPU runs the kernels
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SIGNIFICANCE = 1e-4  # every goodness-of-fit test in the suite rejects at this level
MIN_EXPECTED = 5.0  # cells expected to hold fewer draws than this are pooled

# The sampling transforms every exactness test runs through (one table for the whole suite).
TRANSFORMS = {
    "greedy": {"temperature": 0.0},
    "temperature_0.7": {"temperature": 0.7},
    "temperature_1.3": {"temperature": 1.3},
    "top_k_3": {"top_k": 3},
    "top_p_0.8": {"top_p": 0.8},
    "min_p_0.2": {"min_p": 0.2},
    "combined": {"temperature": 0.8, "top_k": 4, "top_p": 0.9, "min_p": 0.05},
}


def reference_transform(
    logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> np.ndarray:
    """The documented sampling transform, row by row in float64: [..., V] -> [..., V].

    Order: temperature (0 = argmax, ties to the lowest id), top-k, top-p (keep the most likely
    tokens until the mass strictly before a token reaches top_p), min-p (relative to the largest
    remaining probability), renormalise.
    """
    logits = np.asarray(logits, dtype=np.float64)
    flat = logits.reshape(-1, logits.shape[-1])
    out = np.zeros_like(flat)
    for row, z in zip(out, flat):
        if temperature == 0:
            row[int(np.argmax(z))] = 1.0  # np.argmax returns the first maximum
            continue
        probs = np.exp((z - z.max()) / temperature)
        probs /= probs.sum()
        order = sorted(range(len(z)), key=lambda i: -probs[i])
        if top_k and top_k < len(z):
            for i in order[top_k:]:
                probs[i] = 0.0
        if top_p < 1.0:
            probs /= probs.sum()
            mass_before = 0.0
            for i in order:
                if mass_before >= top_p:
                    probs[i] = 0.0
                mass_before += probs[i]
        if min_p > 0.0:
            probs[probs < min_p * probs.max()] = 0.0
        row[:] = probs / probs.sum()
    return out.reshape(logits.shape)


class Fit(NamedTuple):
    pvalue: float  # 0.0 when a draw landed on a cell of probability 0
    statistic: float
    impossible: int  # draws on cells of probability 0
    cells: int  # cells after pooling


def _pool(expected_counts: np.ndarray) -> list[np.ndarray]:
    """Groups of cell indices: each big cell alone, the small ones (< MIN_EXPECTED) together."""
    positive = np.flatnonzero(expected_counts > 0)
    big = [np.array([i]) for i in positive if expected_counts[i] >= MIN_EXPECTED]
    small = np.array([i for i in positive if expected_counts[i] < MIN_EXPECTED], dtype=np.int64)
    if small.size:
        if expected_counts[small].sum() >= MIN_EXPECTED or not big:
            big.append(small)
        else:  # too small even together: fold into the smallest big cell
            j = min(range(len(big)), key=lambda k: expected_counts[big[k]].sum())
            big[j] = np.concatenate([big[j], small])
    return big


def chi_square(codes, law) -> Fit:
    """Pearson chi-square of integer draws `codes` (cell ids) against the probabilities `law`.

    Draws on cells of probability 0 make the fit fail outright (p-value 0): exactness forbids them.
    """
    law = np.asarray(law, dtype=np.float64).ravel()
    assert abs(law.sum() - 1.0) < 1e-9, law.sum()
    codes = np.asarray(codes, dtype=np.int64).ravel()
    n = codes.size
    counts = np.bincount(codes, minlength=law.size)
    impossible = int(counts[law <= 0].sum())
    if impossible:
        return Fit(0.0, float("inf"), impossible, 0)
    groups = _pool(law * n)
    if len(groups) < 2:
        return Fit(1.0, 0.0, 0, len(groups))
    observed = np.array([counts[g].sum() for g in groups], dtype=np.float64)
    expected = np.array([law[g].sum() * n for g in groups])
    result = stats.chisquare(observed, expected)
    return Fit(float(result.pvalue), float(result.statistic), 0, len(groups))


class Power(NamedTuple):
    power: float
    noncentrality: float  # n * sum (law_bad - law)^2 / law over the pooled cells
    critical: float  # the chi-square statistic's rejection threshold
    cells: int


def chi_square_power(law, bad_law, n: int, significance: float = SIGNIFICANCE) -> Power:
    """Power of `chi_square` at `significance` against draws from `bad_law`, n draws.

    The usual noncentral chi-square approximation of Pearson's statistic, pooled exactly as the test
    pools. Mass of `bad_law` on cells where `law` is 0 makes the test fail with certainty as soon as
    one such draw appears; that is counted too (probability 1 - (1 - mass)^n).
    """
    law = np.asarray(law, dtype=np.float64).ravel()
    bad_law = np.asarray(bad_law, dtype=np.float64).ravel()
    impossible_mass = float(bad_law[law <= 0].sum())
    groups = _pool(law * n)
    expected = np.array([law[g].sum() for g in groups])
    bad = np.array([bad_law[g].sum() for g in groups])
    df = len(groups) - 1
    noncentrality = float(n * ((bad - expected) ** 2 / expected).sum())
    critical = float(stats.chi2.ppf(1 - significance, df))
    power = float(stats.ncx2.sf(critical, df, noncentrality)) if df > 0 else 0.0
    power = 1 - (1 - power) * (1 - impossible_mass) ** n
    return Power(power, noncentrality, critical, len(groups))


def chain_law(start: int, num_tokens: int, target: np.ndarray) -> np.ndarray:
    """Law of the next `num_tokens` tokens of a Markov chain after `start`: [V] * num_tokens.

    target [V, V]: target[c] is the law of the token after c.
    """
    law = target[start]
    for _ in range(num_tokens - 1):
        law = law[..., None] * target  # [..., a, b] = law[..., a] * target[a, b]
    return law


def speculative_law_gamma1(
    start: int,
    num_tokens: int,
    target: np.ndarray,  # [V, V] law the verifier uses for acceptance, residual and bonus
    draft_sampled: np.ndarray,  # [V, V] law the draft token is really drawn from
    accept: np.ndarray,  # [V, V] accept[c, x]: probability the verifier keeps draft x after c
    residual: np.ndarray,  # [V, V] residual[c]: law of the recovered token after a rejection at c
    plain_last_token: bool,
) -> np.ndarray:
    """Exact law of the first `num_tokens` tokens emitted by a γ = 1 speculative sampler: [V]*k.

    Each step after token c drafts x ~ draft_sampled[c]; with probability accept[c, x] it emits x
    and a bonus y ~ target[x], otherwise one token r ~ residual[c]. With `plain_last_token` a step
    that may emit only one more token drafts nothing (the engine's rule) and draws from target[c].
    Any broken acceptance rule or residual can be plugged in, which gives the negative controls
    their exact law and hence an honest power.
    """
    vocab = target.shape[0]
    reject = 1.0 - (draft_sampled * accept).sum(-1)  # [V]

    @cache
    def emit(c: int, m: int) -> np.ndarray:
        if m == 0:
            return np.ones(())
        if m == 1 and plain_last_token:
            return target[c].copy()
        out = np.zeros((vocab,) * m)
        for x in range(vocab):
            w = draft_sampled[c, x] * accept[c, x]
            if m == 1:
                out[x] += w
            else:
                for y in range(vocab):
                    out[x, y] += w * target[x, y] * emit(y, m - 2)
        for r in range(vocab):
            out[r] += reject[c] * residual[c, r] * emit(r, m - 1)
        return out

    return emit(start, num_tokens)


def honest_accept(target: np.ndarray, draft: np.ndarray) -> np.ndarray:
    """min(1, p/q) row by row, 1 where q = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(draft > 0, np.minimum(1.0, target / np.where(draft > 0, draft, 1.0)), 1.0)


def honest_residual(target: np.ndarray, draft: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)) row by row; p where that is empty."""
    residual = np.maximum(target - draft, 0.0)
    mass = residual.sum(-1, keepdims=True)
    return np.where(mass > 1e-12, residual / np.where(mass > 0, mass, 1.0), target)


def pair_laws(start: int, num_tokens: int, target: np.ndarray) -> list[np.ndarray]:
    """Law of each adjacent pair (t_j, t_j+1), j = 1..num_tokens-1, of a chain: list of [V, V]."""
    marginal = target[start]
    laws = []
    for _ in range(num_tokens - 1):
        laws.append(marginal[:, None] * target)
        marginal = marginal @ target
    return laws


@pytest.fixture(scope="session")
def gof() -> SimpleNamespace:
    """Goodness-of-fit toolkit (see the module docstring)."""
    return SimpleNamespace(
        SIGNIFICANCE=SIGNIFICANCE,
        transform=reference_transform,
        chi_square=chi_square,
        power=chi_square_power,
        chain_law=chain_law,
        pair_laws=pair_laws,
        speculative_law_gamma1=speculative_law_gamma1,
        honest_accept=honest_accept,
        honest_residual=honest_residual,
    )


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Triton, on the GPU ("cuda") or interpreted on the CPU ("cpu"); skips where triton is missing."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1: run with it set")
    return "cpu"


@pytest.fixture(scope="session", autouse=True)
def _triton_settings():
    """SPECULANT_TEST_TRITON_SETTINGS="PDL=1,PREFETCH=4": the whole run under these speculant.models.triton_layers
    settings (integers where they parse as such), to test on a GPU settings that are not yet the defaults."""
    text = os.environ.get("SPECULANT_TEST_TRITON_SETTINGS", "")
    if not text:
        yield
        return
    from speculant.models import triton_layers

    try:
        values = triton_layers.parse_settings(text)
    except ValueError as error:
        raise pytest.UsageError(f"SPECULANT_TEST_TRITON_SETTINGS: {error}") from None
    with triton_layers.settings(values):
        yield


def byte_level_backend(specials: list[str]):
    """A byte-level BPE `tokenizers.Tokenizer`: the special tokens (ids 0..len(specials) - 1), then the
    256 byte symbols, then the merges "ab" and "cd"."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(specials + symbols + ["ab", "cd"])}
    backend = Backend(models.BPE(vocab=vocab, merges=[("a", "b"), ("c", "d")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return backend
