"""Self-evaluation: score a group of K answers with no reward model and no labels.

Signals (one module each, registered by name): consistency, grounding, reasoning, safety, education.
`SelfScorer` runs the configured signals on a group, combines them (composite.py) and writes each
completion's scores, composite and advantage.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from ..config import ScoringConfig
from ..errors import ConfigError
from ..records import Group
from . import consistency, education, grounding, reasoning, safety  # noqa: F401 - registers the scorers
from .base import ScoreContext, Scorer, ScoreResult, make_scorer, register, registered
from .composite import GroupScores, apply_penalties, blend_feedback, combine, group_advantages, penalties

__all__ = [
    "GroupScores", "ScoreContext", "ScoreResult", "Scorer", "SelfScorer", "apply_penalties", "blend_feedback",
    "build_self_scorer", "combine", "group_advantages", "make_scorer", "penalties", "register", "registered",
]


class SelfScorer:
    """Runs the signals on groups, combines them and computes group-relative advantages."""

    def __init__(self, scorers: Sequence[Scorer], weights: dict[str, float], gates: Iterable[str] = (),
                 scale: str = "group", eps: float = 1e-4, length_penalty: float = 0.0, min_answer_words: int = 8,
                 repetition_penalty: float = 0.0):
        self.scorers = list(scorers)
        self.weights = dict(weights)
        self.gates = tuple(gates)
        self.scale, self.eps = scale, eps
        self.penalty = {"length_penalty": length_penalty, "min_answer_words": min_answer_words,
                        "repetition_penalty": repetition_penalty}

    def score_group(self, group: Group, context: ScoreContext) -> tuple[GroupScores, list[ScoreResult]]:
        """Score one group and write each completion's per-signal scores and composite."""
        results = [s.score(group, context) for s in self.scorers]
        scored = combine(results, self.weights, len(group.completions), gates=self.gates)
        if self.penalty["length_penalty"] or self.penalty["repetition_penalty"]:
            apply_penalties(scored, penalties([c.text for c in group.completions], **self.penalty))
        scored.explanations = {r.name: r.explanations for r in results}
        for i, c in enumerate(group.completions):
            c.scores = {name: values[i] for name, values in scored.signals.items()}
            c.composite = scored.composite[i]
        return scored, results

    def score_groups(self, groups: Sequence[Group], contexts: Sequence[ScoreContext]) -> list[GroupScores]:
        """Score a batch of groups and write advantages (the scale may span the batch)."""
        scored = [self.score_group(g, c)[0] for g, c in zip(groups, contexts)]
        advantages, flat = group_advantages([s.composite for s in scored], self.scale, self.eps)
        for group, adv, zero in zip(groups, advantages, flat):
            group.zero_variance = zero
            for c, a in zip(group.completions, adv):
                c.advantage = a
        return scored


def build_self_scorer(cfg: ScoringConfig, embedder=None, judge=None, species: Iterable[str] = ()) -> SelfScorer:
    """The SelfScorer the config asks for: signals with a weight (or a gate) are built, others are not."""
    active = [n for n, w in cfg.weights.items() if w > 0] + [g for g in cfg.gates if g not in cfg.weights]
    scorers = []
    for name in active:
        if name in ("grounding", "consistency", "education"):
            if embedder is None:
                raise ConfigError(f"the {name} scorer needs an embedder")
            scorers.append(make_scorer(name, embedder=embedder))
        elif name == "safety":
            scorers.append(make_scorer(name, rules=cfg.safety_rules, species=species))
        elif name == "reasoning":
            if judge is None:
                raise ConfigError("the reasoning scorer needs a judge model: load the policy or scoring.judge")
            scorers.append(make_scorer(name, judge=judge))
        else:
            scorers.append(make_scorer(name))
    return SelfScorer(scorers, cfg.weights, cfg.gates, cfg.scale, cfg.eps, cfg.length_penalty, cfg.min_answer_words,
                      cfg.repetition_penalty)
