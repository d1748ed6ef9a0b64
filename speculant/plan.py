"""What drafts for the target, as one value: the draft specs, γ, candidates per position and the
lookup branch. The API (speculant.load, Speculant), the command line (--draft, --gamma,
--candidates, --lookup) and the benchmark (--methods) all build a DraftPlan, so the options are
checked in one place; the benchmark writes a plan as one piece of text:

    SPEC[+SPEC...][#kK][#lookupG][@GAMMA]     e.g. int8+ngram@auto, distilled#k4#lookup16@3

>>> DraftPlan.parse("distilled#k4#lookup16@3")
DraftPlan(drafts=('distilled',), gamma=3, candidates=4, lookup=16)
>>> DraftPlan.parse("int8+ngram", gamma="auto").text()
'int8+ngram@auto'
"""

from __future__ import annotations

from dataclasses import dataclass

from speculant.adaptive import parse_gamma


@dataclass(frozen=True)
class DraftPlan:
    drafts: tuple[str, ...] = ("default",)  # drafts[0] drafts for the target, each further one for the one before
    gamma: int | str = 4  # draft length, or "auto" (speculant.adaptive)
    candidates: int = 1  # candidates per draft position, scored as one tree (1: a chain)
    lookup: int = 0  # a prompt-lookup branch of up to this many tokens beside the draft model's (0: none)

    def __post_init__(self) -> None:
        drafts = (self.drafts,) if isinstance(self.drafts, str) else self.drafts
        if not isinstance(drafts, (tuple, list)) or not all(isinstance(d, str) and d for d in drafts):
            raise ValueError(f"drafts must be draft specs (non-empty strings), got {self.drafts!r:.80}")
        object.__setattr__(self, "drafts", tuple(drafts) or ("none",))
        if self.gamma != "auto" and (not isinstance(self.gamma, int) or isinstance(self.gamma, bool) or self.gamma < 1):
            raise ValueError(f"gamma must be an integer >= 1 or 'auto', got {self.gamma!r}")
        if not isinstance(self.candidates, int) or isinstance(self.candidates, bool) or self.candidates < 1:
            raise ValueError(f"candidates must be an integer >= 1, got {self.candidates!r}")
        if not isinstance(self.lookup, int) or isinstance(self.lookup, bool) or self.lookup < 0:
            raise ValueError(f"lookup must be an integer >= 0, got {self.lookup!r}")

    @classmethod
    def parse(cls, text: str, gamma: int | str = 4) -> DraftPlan:
        """A plan from its text form; `gamma` where the text pins none."""
        name, at, pinned = text.partition("@")
        name, *modifiers = name.split("#")
        options = {}
        for modifier in modifiers:
            for prefix, option in (("lookup", "lookup"), ("k", "candidates")):
                if modifier.startswith(prefix) and modifier[len(prefix):].isdigit():
                    options[option] = int(modifier[len(prefix):])
                    break
            else:
                raise ValueError(f"method {text!r}: unknown option #{modifier} (use #kK for K candidates per position, "
                                 "#lookupG for a lookup branch of G tokens)")
        drafts = tuple(p.strip() for p in name.split("+") if p.strip())
        if not drafts:
            raise ValueError(f"empty method {text!r}")
        return cls(drafts, parse_gamma(pinned) if at else gamma, **options)

    def text(self) -> str:
        """The text form `parse` reads."""
        options = (f"#k{self.candidates}" if self.candidates > 1 else "") + (f"#lookup{self.lookup}" if self.lookup else "")
        return f"{'+'.join(self.drafts)}{options}@{self.gamma}"
