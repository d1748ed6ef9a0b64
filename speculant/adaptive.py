"""Adaptive γ (`--gamma auto`): pick the draft length each step from online estimates.

The policy asks for γ before the draft exists; the drafter then proposes n ≤ γ tokens (a model
draft proposes γ, prompt lookup may propose fewer, or none on a miss: that step is a plain step).
Model of one step with requested length γ, every quantity measured online:

    proposal     s_k   = P(n ≥ k | n ≥ k−1, k ≤ γ)          per position k (n-gram misses, short matches)
                 P(n ≥ k | γ) = s_1 ··· s_k  for k ≤ γ,  0 beyond
    acceptance   a_k   = P(draft k accepted | drafts 1..k−1 accepted, n ≥ k)      per position k
    tokens       E(γ)  = 1 + Σ_{k=1..γ} P(n ≥ k | γ) · a_1 ··· a_k                (Eq. 1 when a_k = α, s_k = 1)
    time         T(γ)  = D(γ) + Σ_n P(n | γ) · V[n]
                 V[n]  = measured time of verifying n drafted tokens (n + 1 positions), one estimate per n
                 D(γ)  = d_0 + d_1 · E[n | γ]  for γ ≥ 1 (least squares on the drafting steps), D(0) = 0
    choose       γ* = argmax_γ E(γ) / T(γ),  γ in 0..max_gamma

V is a table, not a line: on a CPU the cost of a forward over 2, 3, 4... positions is neither
constant nor linear in them (BLAS picks kernels by row count: for SmolLM2-135M on one core,
verifying 1 or 2 drafts, i.e. 2 or 3 positions, costs more than verifying 3), and a fitted line
mis-prices every length. Per-position a_k and s_k replace a single α: n-gram drafts are often
right for a whole run once their first token is, and often propose nothing at all — a miss costs
a plain step, not a lost one, so misses alone never switch speculation off.

Estimates. a_k and s_k come from counts that only steps which asked for a draft update and age
(half-life `half_life` such steps): while speculation is off, its evidence stays as it was. Each
recent rate is shrunk towards a long-run one (half-life `long_half_life`, weight one step), and
the long-run a_k towards the long-run a_{k−1} (weight CHAIN_WEIGHT steps), so a position seldom
tested borrows from the one before; s_k shrinks towards 1. V[n] is an average per observation of
that n (half-life `cost_half_life` observations; an observation beyond 0.5–2× the estimate is
clipped, so one disturbed step cannot swing it; a length's first observation beyond 4× its prior
is set aside once, so that a one-time cost such as a graph capture does not price a length out for
good), all V[n] age slowly (half-life
`cost_age_half_life` steps) so that a length measured once, perhaps badly (another job on the
machine, a one-time graph capture), drifts back to its prior and is measured again. A length
never measured is priced at V[0] · (1 + 0.02 n), weight a quarter observation: optimism, so each
length is tried once if acceptance says it could pay. D is a least-squares line on the drafting
steps.

Switching. γ = 0 is plain decoding, so speculation switches itself off when no γ can win (the
paper's α ≤ c case). Once on, it stays on while the best γ ≥ 1 still beats plain with acceptance
raised by STAY_ON_Z standard errors (hysteresis against estimation noise). While on, a plain step
is taken when V[0] has never been measured and once every `max_probe_every` steps, since every γ
is judged against it. While off, the policy probes with the best γ ≥ 1, at least `probe_every`
plain steps apart and only while its exploration budget is not overdrawn: each plain step earns
`explore` × V[0] (at most MAX_CREDIT plain steps' worth is banked), each probe is charged its
measured loss, (its time) − (its tokens) × V[0]. A useless drafter so costs about `explore` of
plain speed; a probe that wins pays for the next one, so a drafter that turns good is re-enabled
within a few probes; after `max_probe_every` plain steps a probe is made regardless.

With a run-ahead stepper (speculant.fused, on CUDA) the engine chooses each step's γ together with
the step before it, which the stepper launches it behind, before that step is observed: the choices
lag the evidence by one step, and `observe` is told which γ the observed step asked for. Such a stepper runs some steps alone (a
request's first, one cut to the room left at a request's end, one after a plain step), 5-15 % slower
than the same length run ahead; `observe(timed=False)` says so, and they teach acceptance only. Else a
length the policy does not choose is timed on those steps alone, priced too high and never retried
(an H100 chat run took γ 5 in 679 of 684 steps, with γ 3 and 4 priced 6-8 % above their cost).

The estimates live in the policy object; reusing one policy across requests of the same (target,
drafter) pair carries them over as the prior for the next request. Which policy is used never
changes the output law: γ is chosen before the draft exists, from past steps only.
"""

from __future__ import annotations

PRIOR_WEIGHT = 1.0  # how many recent steps the long-run rate counts as
MAX_CREDIT = 1.0  # most exploration budget that can be banked, in plain steps
CHAIN_WEIGHT = 4.0  # how many steps a position's acceptance borrows from the position before
STAY_ON_Z = 0.5  # hysteresis: standard errors of acceptance an "on" policy gives the drafter
FIRST_OUTLIER = 4.0  # a length's first verify time beyond this many times its prior is set aside once


class AdaptiveGamma:
    def __init__(self, max_gamma: int = 12, initial_gamma: int = 4, half_life: float = 8.0,
                 probe_every: int = 4, max_probe_every: int = 128, explore: float = 0.02,
                 cost_half_life: float = 8.0, long_half_life: float = 128.0,
                 cost_age_half_life: float = 1024.0) -> None:
        if max_gamma < 1:
            raise ValueError(f"max_gamma must be >= 1, got {max_gamma}")
        if not 0.0 <= explore < 1.0:
            raise ValueError(f"explore must be in [0, 1), got {explore}")
        self.max_gamma = max_gamma
        self.initial_gamma = max(0, min(initial_gamma, max_gamma))
        self.decay = 0.5 ** (1.0 / half_life)
        self.long_decay = 0.5 ** (1.0 / max(long_half_life, half_life))
        self.cost_decay = 0.5 ** (1.0 / cost_half_life)
        self.cost_age = 0.5 ** (1.0 / cost_age_half_life)
        self.probe_every = max(1, probe_every)
        self.max_probe_every = max(self.probe_every, max_probe_every)
        self.explore = explore
        g = max_gamma + 1  # index k = 1..max_gamma used for positions, n = 0..max_gamma for lengths
        # exponentially weighted counts per draft position k
        self.offered = [0.0] * g    # steps that asked for ≥ k tokens and got ≥ k−1
        self.proposed = [0.0] * g   # steps whose drafter proposed ≥ k tokens
        self.tested = [0.0] * g     # steps with ≥ k drafted and the first k−1 accepted
        self.accepted = [0.0] * g   # steps with the first k accepted
        # the same counts with a long half-life: the prior the recent counts shrink towards
        self.long = {name: [0.0] * g for name in ("offered", "proposed", "tested", "accepted")}
        # verify time per number drafted n: weighted sums and weights
        self.verify_sum = [0.0] * g
        self.verify_weight = [0.0] * g
        self.set_aside: set[int] = set()  # lengths whose first, outlying verify time was set aside
        # weighted least squares of draft time on n over drafting steps: w, w·n, w·n², w·t, w·n·t
        self.draft_fit = [0.0] * 5
        self.steps_off = 0
        self.credit = 0.0  # exploration budget (seconds): earned by plain steps, spent by probes
        self.probing = False
        self.on = False  # the last choice (not a probe, not a plain re-measurement) was γ ≥ 1
        self.steps_since_plain = 0
        self.last_gamma: int | None = None
        self.history: list[int] = []

    # ---- estimates -------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        """Pooled acceptance (accepted ÷ tested over all positions), with a weak prior of 0.5."""
        return (sum(self.accepted) + 0.5) / (sum(self.tested) + 1.0)

    def _rates(self, hits: str, trials: str, first_prior: float, chain: bool, z: float = 0.0) -> list[float]:
        """Per-position rates (index 0 unused, 1.0): the recent counts shrunk towards the long-run
        rate (weight PRIOR_WEIGHT steps), which is itself shrunk towards `first_prior` for k = 1
        (weight one step) and for k > 1 towards its value at k − 1 (`chain`, weight CHAIN_WEIGHT
        steps: positions seldom tested borrow strength from the one before) or `first_prior`.
        z > 0: that many standard errors above the estimate (an optimistic bound)."""
        long_hits, long_trials = self.long[hits], self.long[trials]
        recent_hits, recent_trials = getattr(self, hits), getattr(self, trials)
        out, prior = [1.0], first_prior
        for k in range(1, self.max_gamma + 1):
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
        """a_k for k = 1..max_gamma (index 0 unused, 1.0); a position never tested borrows k − 1's.
        z > 0: an optimistic bound, z standard errors above."""
        return self._rates("accepted", "tested", 0.5, chain=True, z=z)

    def survival(self) -> list[float]:
        """s_k for k = 1..max_gamma: P(the drafter proposes ≥ k | it proposed ≥ k−1 and γ ≥ k)."""
        return self._rates("proposed", "offered", 1.0, chain=False)

    def _plain_time(self) -> float:
        if self.verify_weight[0] > 0:
            return self.verify_sum[0] / self.verify_weight[0]
        seen = [self.verify_sum[n] / self.verify_weight[n] / (1.0 + 0.02 * n)
                for n in range(1, self.max_gamma + 1) if self.verify_weight[n] > 0]
        return min(seen) if seen else 1.0

    def verify_time(self, n: int) -> float:
        """V[n]: expected target time of a step that drafted n tokens."""
        prior = self._plain_time() * (1.0 + 0.02 * n)  # optimistic for lengths never measured
        if n == 0 and self.verify_weight[0] > 0:
            return prior
        weight = 0.25  # the prior counts as a quarter of one observation
        return (self.verify_sum[n] + weight * prior) / (self.verify_weight[n] + weight)

    def draft_time(self, mean_drafted: float) -> float:
        """D: draft time of a step that asked for γ ≥ 1 and drafts `mean_drafted` on average."""
        w, wn, wnn, wt, wnt = self.draft_fit
        if w <= 0:
            return 0.0
        mean_n, mean_t = wn / w, wt / w
        var_n = wnn / w - mean_n**2
        if var_n > 1e-6 * max(mean_n**2, 1.0):
            slope = max((wnt / w - mean_n * mean_t) / var_n, 0.0)
            intercept = mean_t - slope * mean_n
            if intercept < 0:  # keep both parts non-negative: refit through the origin
                slope, intercept = (wnt / wnn if wnn > 0 else 0.0), 0.0
        elif mean_n > 0:  # one length only (a model draft at a fixed γ): proportional
            slope, intercept = mean_t / mean_n, 0.0
        else:
            slope, intercept = 0.0, mean_t
        return max(intercept + slope * mean_drafted, 0.0)

    def verify_table(self) -> list[float]:
        """V[n] for n = 0..max_gamma."""
        return [self.verify_time(n) for n in range(self.max_gamma + 1)]

    def expected(self, gamma: int, acc: list[float] | None = None, surv: list[float] | None = None,
                 verify: list[float] | None = None) -> tuple[float, float]:
        """(expected tokens, expected seconds) of a step that asks for γ."""
        verify = verify if verify is not None else self.verify_table()
        if gamma <= 0:
            return 1.0, verify[0]
        acc = acc if acc is not None else self.acceptance()
        surv = surv if surv is not None else self.survival()
        tokens, time, mean_n = 1.0, 0.0, 0.0
        reach, all_accepted = 1.0, 1.0  # P(n ≥ k), P(first k accepted | n ≥ k)
        for k in range(1, gamma + 1):
            stop_here = reach * (1.0 - surv[k])  # P(n = k − 1)
            time += stop_here * verify[k - 1]
            mean_n += stop_here * (k - 1)
            reach *= surv[k]
            all_accepted *= acc[k]
            tokens += reach * all_accepted
        time += reach * verify[gamma]
        mean_n += reach * gamma
        return tokens, time + self.draft_time(mean_n)

    def expected_rate(self, gamma: int) -> float:
        """Expected tokens per second with draft length γ."""
        tokens, time = self.expected(gamma)
        return tokens / max(time, 1e-12)

    def expected_rates(self, z: float = 0.0) -> list[float]:
        """expected_rate(γ) for γ = 0..max_gamma (z > 0: with optimistic acceptance)."""
        acc, surv, verify = self.acceptance(z), self.survival(), self.verify_table()
        out = []
        for gamma in range(self.max_gamma + 1):
            tokens, time = self.expected(gamma, acc, surv, verify)
            out.append(tokens / max(time, 1e-12))
        return out

    # ---- policy ----------------------------------------------------------------------------
    def choose(self) -> int:
        if not self.history and not any(self.verify_weight):
            gamma = self.initial_gamma
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
                # plain steps are what every γ is measured against: measure one now and then
                if not self.verify_weight[0] or self.steps_since_plain >= self.max_probe_every:
                    gamma = 0
        self.last_gamma = gamma
        self.history.append(gamma)
        return gamma

    def _maybe_probe(self, rates: list[float]) -> int:
        """Off: probe with the best γ ≥ 1 when the exploration budget is not overdrawn."""
        self.steps_off += 1
        self.credit = min(self.credit + self.explore * self.verify_time(0), MAX_CREDIT * self.verify_time(0))
        due = self.steps_off >= self.max_probe_every
        if due or (self.steps_off >= self.probe_every and self.credit >= 0.0):
            self.steps_off = 0
            self.probing = True
            return max(range(1, self.max_gamma + 1), key=rates.__getitem__)
        return 0

    def observe(self, drafted: int, accepted: int, draft_time: float, target_time: float,
                asked: int | None = None, timed: bool = True) -> None:
        """One step's outcome. `asked`: the γ that step asked for (default: the last choice; a caller
        that chooses the next step's γ before observing this one, as run-ahead does, passes it).
        `timed=False`: the step's time is not what its length costs when chosen (a run-ahead stepper
        ran it alone: a request's first step, one cut to the room left at a request's end, one after
        a plain step), so it teaches acceptance only, not V[n] or D."""
        if asked is not None:
            self.last_gamma = asked
        if self.probing:  # charge the probe's measured loss against plain steps to the budget
            self.credit -= draft_time + target_time - (accepted + 1) * self.verify_time(0)
            self.probing = False
        d = self.decay
        asked = self.last_gamma if self.last_gamma is not None else drafted
        asked = max(min(max(asked, drafted), self.max_gamma), 0)
        drafted = min(drafted, self.max_gamma)
        accepted = min(accepted, drafted)
        for k in range(1, self.max_gamma + 1 if asked >= 1 else 1):  # plain steps teach nothing here
            events = {"offered": asked >= k and drafted >= k - 1, "proposed": drafted >= k,
                      "tested": drafted >= k and accepted >= k - 1, "accepted": accepted >= k}
            for name, event in events.items():
                recent, long_run = getattr(self, name), self.long[name]
                recent[k] = recent[k] * d + event
                long_run[k] = long_run[k] * self.long_decay + event
        self.steps_since_plain = self.steps_since_plain + 1 if drafted else 0
        if not timed:
            self.last_gamma = None
            return
        if asked >= 1:  # only steps that asked for a draft carry (and age) draft evidence
            n = float(drafted)
            self.draft_fit = [s * d + x for s, x in zip(self.draft_fit, (1.0, n, n * n, draft_time, n * draft_time))]
        # verify time of this length: clip far-off observations once the estimate has some weight. A
        # length's first observation beyond FIRST_OUTLIER x its prior is set aside once: a one-time
        # cost (a graph capture, a compilation) would otherwise price that length out for good, since
        # a length judged slow is not tried again to correct it
        w = self.verify_weight[drafted]
        if w >= 1.0:
            mean = self.verify_sum[drafted] / w
            target_time = min(max(target_time, 0.5 * mean), 2.0 * mean)
        elif (drafted not in self.set_aside and self.verify_weight[0] > 0
              and target_time > FIRST_OUTLIER * self.verify_time(drafted)):
            self.set_aside.add(drafted)
            self.last_gamma = None
            return
        c = self.cost_decay
        self.verify_sum[drafted] = self.verify_sum[drafted] * c + target_time
        self.verify_weight[drafted] = w * c + 1.0
        # every estimate also ages slowly, so a length measured once, perhaps badly (a disturbed
        # step, a one-time cost), drifts back to its prior and gets measured again
        for n in range(self.max_gamma + 1):
            self.verify_sum[n] *= self.cost_age
            self.verify_weight[n] *= self.cost_age
        self.last_gamma = None


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
