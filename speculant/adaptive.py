"""Adaptive γ (`--gamma auto`): pick each step's draft length from the request's own acceptance and a
fixed table of step costs.

The policy asks for γ before the draft exists; the drafter then proposes n ≤ γ tokens (a model
draft proposes γ, prompt lookup may propose fewer, or none on a miss: that step is a plain step).
Model of one step with requested length γ:

    proposal     s_k   = P(n ≥ k | n ≥ k−1, k ≤ γ)          per position k (n-gram misses, short matches)
                 P(n ≥ k | γ) = s_1 ··· s_k  for k ≤ γ,  0 beyond
    acceptance   a_k   = P(depth k reached | depth k−1 reached, n ≥ k)      per position k
    tokens       E(γ)  = 1 + Σ_{k=1..γ} P(n ≥ k | γ) · a_1 ··· a_k  [+ the lookup branch, below]   (Eq. 1 when a_k = α, s_k = 1)
    time         T(γ)  = Σ_n P(n | γ) · C[n]
    choose       γ* = argmax_γ E(γ) / T(γ),  γ in 0..max_gamma

C is a `StepCosts` table: the seconds of a whole step (draft and verify) whose chain drafted n tokens,
with the tree the target verifies at that n (1 + n·K nodes with K candidates per position, + G with a
lookup branch of G); C[0] is a plain step's seconds per token it emits (a fused stepper decodes a
plain step's chunk of tokens in one graph replay, under `auto` as in plain decoding). It is measured once per machine, device, dtype, model pair, drafter settings,
stepper and thread count by speculant.calibrate, through the stepper that runs the requests (a fused
CUDA-graph stepper run ahead, as it runs), kept on disk and read back by every later load; where it
cannot be kept, `nominal_costs` gives a fixed one. C is a table, not a line: on a CPU the cost of a
forward over 2, 3, 4... positions is neither constant nor linear in them (BLAS picks kernels by row
count: for SmolLM2-135M on one core, verifying 2 or 3 positions cost more than 4).

Reproducible. Nothing the policy decides depends on a clock: its inputs are the table, which does not
change during or between requests, and what the request's own steps drafted and kept. A request
starts from the same prior every time (the api makes a fresh policy per request; carrying estimates
over would make a request's tokens depend on the requests before it), so a seeded request gives the
same tokens on every run on the same machine, on one loaded object or a fresh load in a new process;
which γ is chosen never changes the output law either, since γ is chosen before the draft exists, from
past steps only.

The lookup branch (`lookup` G > 0, a model draft beside prompt lookup, drafters.lookup). The chain is
the draft model's (it drafts all γ asked for). A step reaches depth D = max(A, R): A the chain's
reach (with its alternatives), R the lookup branch's (how many of its L tokens, 0 on a miss, the
target keeps; acceptance.verify_candidates grafts the branch where it leaves the chain). For k ≤ γ,
a_k is measured on the tree's depth, D ≥ k, which does not depend on γ; past the chain D ≥ k iff R ≥ k:

    E(γ)  = 1 + Σ_{k=1..γ} a_1 ··· a_k + Σ_{k=γ+1..G} r_1 ··· r_k,   r_j = P(R ≥ j | R ≥ j−1)

R is read off each step as the number of the branch's first tokens the emitted tokens begin with (the
law of keeping a lookup token is the target's probability of it, so this is R's law); where the emitted
tokens all match it is cut there (right-censored: depth j counts as tried only where it was seen).

Estimates. a_k, s_k and r_j come from counts that only steps which asked for a draft update and age
(half-life `half_life` such steps): while speculation is off, its evidence stays as it was. Each recent
rate is shrunk towards a longer-run one (half-life `long_half_life`, weight one step), and the
longer-run a_k (r_j) towards the longer-run a_{k−1} (r_{j−1}) (weight CHAIN_WEIGHT steps), so a
position seldom tested borrows from the one before; the first position's prior is `prior_acceptance`,
s_k shrinks towards 1.

Switching. γ = 0 is plain decoding, so speculation switches itself off when no γ can win (the paper's
α ≤ c case). Once on, it stays on while the best γ ≥ 1 still beats plain with acceptance raised by
STAY_ON_Z standard errors (hysteresis against estimation noise). While off, the policy probes with the
best γ ≥ 1, at least `probe_every` plain steps apart and only while its exploration budget is not
overdrawn: each plain step earns `explore` × C[0] (at most MAX_CREDIT plain steps' worth is banked),
each probe is charged its priced loss, C[n] − (its tokens) × C[0]. A useless drafter so costs about
`explore` of plain speed; a probe that wins pays for the next one, so a drafter that turns good is
re-enabled within a few probes; after `max_probe_every` plain steps a probe is made regardless. (A
plain step that decodes a chunk of tokens counts as one step here: while off, a fused stepper probes
that many times fewer per token.) The first step asks for `initial_gamma`, to see the drafter at work
at once.

With a run-ahead stepper (speculant.fused, on CUDA) the engine chooses each step's γ together with the
step before it, before that step is observed: the choices lag the evidence by one step, and `observe`
is told which γ the observed step asked for.

The batched engine's table lives here too: `BatchStepCosts`, the seconds of one batched step by batch
bucket (rows rounded up to a power of two, `batch_bucket`) and Γ, measured the same way, once, through
the batched engine's own step (speculant.calibrate), or `nominal_batch_costs`; speculant.batching's
LoadGamma prices its steps by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRIOR_WEIGHT = 1.0  # how many recent steps the longer-run rate counts as
MAX_CREDIT = 1.0  # most exploration budget that can be banked, in plain steps
CHAIN_WEIGHT = 4.0  # how many steps a position's acceptance borrows from the position before
STAY_ON_Z = 0.5  # hysteresis: standard errors of acceptance an "on" policy gives the drafter
MAX_GAMMA = 12  # the longest draft `--gamma auto` considers
BATCH_MAX_GAMMA = 8  # the longest draft batched `--gamma auto` considers (speculant.batching)
CHAIN_COUNTS = ("offered", "proposed", "tested", "accepted")  # per chain position k
LOOKUP_COUNTS = ("lookup_tested", "lookup_kept")  # per depth j


@dataclass(frozen=True)
class StepCosts:
    """Seconds of one step by the number of tokens its chain drafted, n = 0..max_gamma (0: a plain
    step), for one machine, device, dtype, model pair, drafter settings and stepper; `how` says where
    the numbers came from: measured (speculant.calibrate), cached (read back) or nominal."""

    step: tuple[float, ...]  # [max_gamma + 1]
    how: str = "nominal"

    def __post_init__(self) -> None:
        step = tuple(self.step)
        if len(step) < 2 or not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in step):
            raise ValueError(f"step costs must be at least two positive finite numbers of seconds, got {step!r:.120}")
        object.__setattr__(self, "step", tuple(float(t) for t in step))

    @property
    def max_gamma(self) -> int:
        return len(self.step) - 1


def nominal_costs(max_gamma: int = MAX_GAMMA, device_type: str = "cpu", draft_cost: float = 0.1, candidates: int = 1,
                  lookup: int = 0) -> StepCosts:
    """A fixed table, in plain steps, for when no measured one can be kept (speculant.calibrate): a draft
    token costs `draft_cost` plain steps (0 for prompt lookup), and each further node of the verified
    tree (n·K + G of them) 10 % of a plain step on a CPU, 1 % on a GPU (a small batch is nearly free
    there). Reproducible everywhere; the measured table fits a machine better.

    >>> nominal_costs(2, candidates=2).step
    (1.0, 1.3, 1.6)
    """
    per_node = 0.1 if device_type == "cpu" else 0.01
    return StepCosts(tuple([1.0] + [round(1.0 + draft_cost * n + per_node * (n * candidates + lookup), 9)
                                    for n in range(1, max_gamma + 1)]), "nominal")


class AdaptiveGamma:
    """The `--gamma auto` policy of one request; see the module docstring."""

    def __init__(self, costs: StepCosts | None = None, *, max_gamma: int | None = None, initial_gamma: int = 4,
                 lookup: int = 0, prior_acceptance: float = 0.5, half_life: float = 8.0, probe_every: int = 4,
                 max_probe_every: int = 128, explore: float = 0.02, long_half_life: float = 128.0) -> None:
        costs = costs if costs is not None else nominal_costs(MAX_GAMMA if max_gamma is None else max_gamma)
        max_gamma = costs.max_gamma if max_gamma is None else max_gamma
        if not 1 <= max_gamma <= costs.max_gamma:
            raise ValueError(f"max_gamma must be in 1..{costs.max_gamma} (the step-cost table's), got {max_gamma}")
        if not 0.0 <= explore < 1.0:
            raise ValueError(f"explore must be in [0, 1), got {explore}")
        if not 0.0 < prior_acceptance < 1.0:
            raise ValueError(f"prior_acceptance must be in (0, 1), got {prior_acceptance}")
        if lookup < 0:
            raise ValueError(f"lookup must be >= 0, got {lookup}")
        self.costs = costs.step[: max_gamma + 1]
        self.max_gamma = max_gamma
        self.lookup = lookup
        self.initial_gamma = max(0, min(initial_gamma, max_gamma))
        self.prior_acceptance = prior_acceptance
        self.decay = 0.5 ** (1.0 / half_life)
        self.long_decay = 0.5 ** (1.0 / max(long_half_life, half_life))
        self.probe_every = max(1, probe_every)
        self.max_probe_every = max(self.probe_every, max_probe_every)
        self.explore = explore
        size = max(max_gamma, lookup) + 1  # index k = 1.. used for positions and depths
        # exponentially weighted counts per draft position k (chain) and depth j (lookup branch):
        #   offered    steps that asked for ≥ k tokens and got ≥ k−1      proposed   steps with ≥ k drafted
        #   tested     ≥ k drafted and depth k−1 reached                  accepted   ≥ k drafted and depth k reached
        #   lookup_tested   the branch's reach R ≥ j−1, and depth j seen     lookup_kept   R ≥ j
        names = CHAIN_COUNTS + (LOOKUP_COUNTS if lookup else ())
        self.recent = {name: [0.0] * size for name in names}
        self.long = {name: [0.0] * size for name in names}  # the same with a long half-life: the recent ones' prior
        self.steps_off = 0
        self.credit = 0.0  # exploration budget (seconds): earned by plain steps, spent by probes
        self.probing = False
        self.on = False  # the last choice (not a probe) was γ ≥ 1
        self.last_gamma: int | None = None
        self.history: list[int] = []

    # ---- estimates -------------------------------------------------------------------------
    def _rates(self, hits: str, trials: str, first_prior: float, chain: bool, z: float = 0.0) -> list[float]:
        """Per-position rates (index 0 unused, 1.0): the recent counts shrunk towards the longer-run
        rate (weight PRIOR_WEIGHT steps), which is itself shrunk towards `first_prior` for k = 1
        (weight one step) and for k > 1 towards its value at k − 1 (`chain`, weight CHAIN_WEIGHT
        steps: positions seldom tested borrow strength from the one before) or `first_prior`.
        z > 0: that many standard errors above the estimate (an optimistic bound)."""
        long_hits, long_trials = self.long[hits], self.long[trials]
        recent_hits, recent_trials = self.recent[hits], self.recent[trials]
        out, prior = [1.0], first_prior
        for k in range(1, len(recent_hits)):
            prior_weight = 1.0 if k == 1 or not chain else CHAIN_WEIGHT
            long_run = (long_hits[k] + prior_weight * prior) / (long_trials[k] + prior_weight)
            weight = recent_trials[k] + PRIOR_WEIGHT
            rate = (recent_hits[k] + PRIOR_WEIGHT * long_run) / weight
            if z:
                rate = min(rate + z * (rate * (1.0 - rate) / weight) ** 0.5, 1.0)
            out.append(rate)
            prior = long_run if chain else first_prior
        return out

    def acceptance(self, z: float = 0.0) -> list[float]:
        """a_k (index 0 unused, 1.0); a position never tested borrows k − 1's. z > 0: an optimistic
        bound, z standard errors above."""
        return self._rates("accepted", "tested", self.prior_acceptance, chain=True, z=z)

    def survival(self) -> list[float]:
        """s_k: P(the drafter proposes ≥ k | it proposed ≥ k−1 and γ ≥ k)."""
        return self._rates("proposed", "offered", 1.0, chain=False)

    def lookup_rates(self, z: float = 0.0) -> list[float]:
        """r_j: P(the lookup branch's reach R ≥ j | R ≥ j−1) (index 0 unused); [1.0] without a branch."""
        if not self.lookup:
            return [1.0]
        return self._rates("lookup_kept", "lookup_tested", self.prior_acceptance, chain=True, z=z)

    def expected(self, gamma: int, acc: list[float] | None = None, surv: list[float] | None = None,
                 branch: list[float] | None = None) -> tuple[float, float]:
        """(expected tokens, expected seconds) of a step that asks for γ."""
        if gamma <= 0:
            return 1.0, self.costs[0]
        acc = acc if acc is not None else self.acceptance()
        surv = surv if surv is not None else self.survival()
        tokens, time = 1.0, 0.0
        reach, reached = 1.0, 1.0  # P(n ≥ k), P(depth k reached | n ≥ k)
        for k in range(1, gamma + 1):
            time += reach * (1.0 - surv[k]) * self.costs[k - 1]  # P(n = k − 1) · C[k − 1]
            reach *= surv[k]
            reached *= acc[k]
            tokens += reach * reached
        time += reach * self.costs[gamma]
        if self.lookup:  # past the chain only the lookup branch goes on: P(R ≥ j)
            branch = branch if branch is not None else self.lookup_rates()
            kept = 1.0
            for j in range(1, self.lookup + 1):
                kept *= branch[j]
                if j > gamma:
                    tokens += kept
        return tokens, time

    def expected_rates(self, z: float = 0.0) -> list[float]:
        """Expected tokens per second for γ = 0..max_gamma (z > 0: with optimistic acceptance)."""
        acc, surv, branch = self.acceptance(z), self.survival(), self.lookup_rates(z)
        out = []
        for gamma in range(self.max_gamma + 1):
            tokens, time = self.expected(gamma, acc, surv, branch)
            out.append(tokens / time)
        return out

    # ---- policy ----------------------------------------------------------------------------
    def choose(self) -> int:
        if not self.history:
            gamma = self.initial_gamma  # no evidence yet: see the drafter at work
        else:
            rates = self.expected_rates()
            gamma = max(range(self.max_gamma + 1), key=rates.__getitem__)
            if gamma == 0 and self.on:
                # hysteresis: stay on while an optimistic bound on acceptance still beats plain, so
                # that estimation noise alone does not switch a winning drafter off
                bound = self.expected_rates(z=STAY_ON_Z)
                best_on = max(range(1, self.max_gamma + 1), key=rates.__getitem__)
                if bound[best_on] > bound[0]:
                    gamma = best_on
            self.on = gamma > 0
            if gamma == 0:
                gamma = self._maybe_probe(rates)
            else:
                self.steps_off = 0
        self.last_gamma = gamma
        self.history.append(gamma)
        return gamma

    def _maybe_probe(self, rates: list[float]) -> int:
        """Off: probe with the best γ ≥ 1 when the exploration budget is not overdrawn."""
        plain = self.costs[0]
        self.steps_off += 1
        self.credit = min(self.credit + self.explore * plain, MAX_CREDIT * plain)
        due = self.steps_off >= self.max_probe_every
        if due or (self.steps_off >= self.probe_every and self.credit >= 0.0):
            self.steps_off = 0
            self.probing = True
            return max(range(1, self.max_gamma + 1), key=rates.__getitem__)
        return 0

    def observe(self, drafted: int, accepted: int, asked: int | None = None, lookup: int = 0,
                lookup_reach: int = 0) -> None:
        """One step's outcome: `drafted` tokens drafted (the tree's depth), `accepted` of them kept
        (the depth reached; accepted + 1 tokens emitted); `lookup` the lookup branch's length L (0:
        none or a miss) and `lookup_reach` how many of its first tokens the emitted tokens begin with.
        `asked`: the γ that step asked for (default: the last choice; a caller that chooses the next
        step's γ before observing this one, as run-ahead does, passes it). No time: costs come from
        the table."""
        asked = asked if asked is not None else self.last_gamma if self.last_gamma is not None else drafted
        asked = max(min(asked, self.max_gamma), 0)
        # the chain: with a lookup branch the draft model's, which drafts all γ asked for
        chain = asked if self.lookup else min(drafted, self.max_gamma)
        asked = max(asked, chain)
        lookup = min(lookup, self.lookup) if asked else 0
        accepted = max(min(accepted, max(chain, lookup)), 0)
        reach = max(min(lookup_reach, lookup, accepted + 1), 0)
        if self.probing:  # charge the probe's priced loss against plain steps to the budget
            self.credit -= self.costs[chain] - (accepted + 1) * self.costs[0]
            self.probing = False
        self.last_gamma = None
        if asked < 1:  # plain steps teach nothing here
            return
        events = {}
        for k in range(1, len(self.recent["offered"])):
            events[k] = {"offered": asked >= k and chain >= k - 1, "proposed": chain >= k,
                         "tested": chain >= k and accepted >= k - 1, "accepted": chain >= k and accepted >= k}
            if self.lookup:  # depth k is seen where a token was emitted there, or the branch ended before it
                events[k].update({"lookup_tested": reach >= k - 1 and (k <= accepted + 1 or k > lookup),
                                  "lookup_kept": reach >= k})
        for name, recent in self.recent.items():
            long_run = self.long[name]
            for k, happened in events.items():
                recent[k] = recent[k] * self.decay + happened[name]
                long_run[k] = long_run[k] * self.long_decay + happened[name]


# ---- the batched engine's table (speculant.batching.LoadGamma) ------------------------------------


def batch_bucket(rows: int) -> int:
    """The power of two >= rows: steps of similar batch sizes share a cost estimate."""
    return 1 << max(rows - 1, 0).bit_length()


def batch_buckets(max_batch: int) -> list[int]:
    """The buckets of batches of 1..max_batch rows: 1, 2, 4, ..., batch_bucket(max_batch)."""
    return [1 << i for i in range(batch_bucket(max_batch).bit_length())]


@dataclass(frozen=True)
class BatchStepCosts:
    """Seconds of one batched step (draft + verify) of B rows at Γ = 0..max_gamma (0: plain batched
    decoding), by batch bucket: step[batch_bucket(B)][Γ], the buckets 1, 2, 4, ... up to the largest
    batch. One table per machine, device, dtype, model pair and engine settings; `how` says where the
    numbers came from: measured (speculant.calibrate), cached (read back) or nominal."""

    step: dict[int, tuple[float, ...]]  # bucket -> [max_gamma + 1] seconds
    how: str = "nominal"

    def __post_init__(self) -> None:
        step = self.step
        buckets = sorted(step) if isinstance(step, dict) and all(type(b) is int and b > 0 for b in step) else []
        if not buckets or buckets != batch_buckets(buckets[-1]):
            raise ValueError(f"batched step costs must map the batch buckets 1, 2, 4, ... to costs, got {step!r:.120}")
        rows = [tuple(step[b]) if isinstance(step[b], (list, tuple)) else () for b in buckets]
        if len({len(costs) for costs in rows}) != 1 or len(rows[0]) < 2 or not all(
                type(t) in (int, float) and math.isfinite(t) and t > 0 for costs in rows for t in costs):
            raise ValueError("each batch bucket's step costs must be the same number (at least two) of positive "
                             f"finite seconds, got {step!r:.120}")
        object.__setattr__(self, "step", {b: tuple(float(t) for t in costs) for b, costs in zip(buckets, rows)})

    @property
    def max_gamma(self) -> int:
        return len(self.step[1]) - 1

    @property
    def max_rows(self) -> int:
        """The largest batch the table prices (its largest bucket)."""
        return max(self.step)

    def cost(self, rows: int, gamma: int) -> float:
        """Seconds of a step of `rows` rows at Γ."""
        bucket = batch_bucket(rows)
        if bucket not in self.step:
            raise ValueError(f"a step of {rows} rows is past the step-cost table (batches of up to {self.max_rows})")
        return self.step[bucket][gamma]


def nominal_batch_costs(max_batch: int, max_gamma: int = BATCH_MAX_GAMMA, device_type: str = "cpu",
                        draft_cost: float = 0.1) -> BatchStepCosts:
    """A fixed table, in plain steps of one row, for when no measured one can be kept
    (speculant.calibrate): a step of B rows at Γ verifies B·(Γ + 1) positions, each beyond the first
    costing 10 % of a plain step on a CPU, 1 % on a GPU, and drafts Γ positions for its rows, each
    `draft_cost` plain steps (0 for prompt lookup) growing with the rows as verifying does. At one row
    it is nominal_costs' table. Reproducible everywhere; a measured table fits a machine better.

    >>> nominal_batch_costs(2, 1).step
    {1: (1.0, 1.2), 2: (1.1, 1.41)}
    """
    per_node = 0.1 if device_type == "cpu" else 0.01
    return BatchStepCosts({bucket: tuple(round(1.0 + per_node * (bucket * (gamma + 1) - 1)
                                               + draft_cost * gamma * (1.0 + per_node * (bucket - 1)), 9)
                                         for gamma in range(max_gamma + 1))
                           for bucket in batch_buckets(max_batch)}, "nominal")


def parse_gamma(text: str) -> int | str:
    """A draft length as users write it: an integer >= 1, or 'auto' (this module's policy).

    >>> parse_gamma("4"), parse_gamma("auto")
    (4, 'auto')
    """
    if text == "auto":
        return text
    try:
        gamma = int(text)
    except ValueError:
        raise ValueError(f"gamma must be an integer >= 1 or 'auto', got {text!r}") from None
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    return gamma
