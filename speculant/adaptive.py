"""Adaptive γ (`--gamma auto`): pick the draft length each step from online estimates.

Model of one step with draft length γ (the paper's §3, with the target's cost allowed to grow with
the number of positions it verifies, which it does on a CPU):

    expected tokens     E(γ) = (1 − α^(γ+1)) / (1 − α)              (Eq. 1)
    expected time       t(γ) = γ · t_draft + t_verify(γ),  t_verify(γ) = a + b·γ
    choose              γ* = argmax_γ E(γ) / t(γ),  γ in 0..max_gamma

γ = 0 is plain decoding, so speculation switches itself off when it cannot win (α too low for the
cost, the paper's α ≤ c case); while off it probes with a short draft every `probe_every` steps
(doubling while probes keep failing) so that it notices when the text becomes predictable.

All estimates are exponentially weighted (half-life `half_life` steps) and live in the policy
object; reusing one policy across requests of the same (target, drafter) pair carries them over
as the prior for the next request. Which policy is used never changes the output law: γ is
chosen before the draft exists, from past steps only.
"""

from __future__ import annotations

from speculant.analysis import expected_tokens_per_call


class AdaptiveGamma:
    def __init__(self, max_gamma: int = 12, initial_gamma: int = 4, half_life: float = 16.0,
                 probe_every: int = 8, max_probe_every: int = 128) -> None:
        if max_gamma < 1:
            raise ValueError(f"max_gamma must be >= 1, got {max_gamma}")
        self.max_gamma = max_gamma
        self.decay = 0.5 ** (1.0 / half_life)
        self.initial_gamma = min(initial_gamma, max_gamma)
        self.probe_every = probe_every
        self.base_probe_every = probe_every
        self.max_probe_every = max_probe_every
        # exponentially weighted sums
        self.accepted = 0.0
        self.tested = 0.0
        self.draft_time = 0.0
        self.drafted = 0.0
        # weighted least squares of verify time on γ: sums of w, w·γ, w·γ², w·t, w·γ·t
        self.fit = [0.0] * 5
        self.steps_off = 0
        self.history: list[int] = []

    # ---- estimates -------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        # a weak prior of α = 0.5 (one tested token) keeps the first steps sane
        return (self.accepted + 0.5) / (self.tested + 1.0)

    def verify_time(self, gamma: int) -> float:
        w, wg, wgg, wt, wgt = self.fit
        if w == 0:
            return 1.0
        mean_g, mean_t = wg / w, wt / w
        var_g = wgg / w - mean_g**2
        slope = max((wgt / w - mean_g * mean_t) / var_g, 0.0) if var_g > 1e-9 else 0.0
        return max(mean_t + slope * (gamma - mean_g), 1e-9)

    def draft_time_per_token(self) -> float:
        return self.draft_time / self.drafted if self.drafted else 0.0

    def expected_rate(self, gamma: int) -> float:
        """Expected tokens per second with draft length γ."""
        tokens = expected_tokens_per_call(min(self.alpha, 0.999), gamma)
        return tokens / (gamma * self.draft_time_per_token() + self.verify_time(gamma))

    # ---- policy ----------------------------------------------------------------------------
    def choose(self) -> int:
        if not self.history and self.tested == 0:
            gamma = self.initial_gamma
        else:
            gamma = max(range(self.max_gamma + 1), key=self.expected_rate)
            if gamma == 0:
                self.steps_off += 1
                if self.steps_off >= self.probe_every:  # probe: has the text become predictable?
                    self.steps_off = 0
                    self.probe_every = min(self.probe_every * 2, self.max_probe_every)
                    gamma = 2
            else:
                self.steps_off = 0
                self.probe_every = self.base_probe_every
        self.history.append(gamma)
        return gamma

    def observe(self, drafted: int, accepted: int, draft_time: float, target_time: float) -> None:
        d = self.decay
        tested = accepted + int(accepted < drafted)
        self.accepted = self.accepted * d + accepted
        self.tested = self.tested * d + tested
        if drafted:
            self.draft_time = self.draft_time * d + draft_time
            self.drafted = self.drafted * d + drafted
        g = float(drafted)
        self.fit = [s * d + x for s, x in zip(self.fit, (1.0, g, g * g, target_time, g * target_time))]
