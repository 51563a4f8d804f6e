"""Domain rules as a gate: 0 for an answer that gives harmful advice about wildlife, 1 otherwise, saying why.

The check is harm.HarmDetector's on answers: the safety rule file's patterns (a clause that advises a
harmful action, or an answer that goes along with a harmful request) and the P(harmful) of a classifier
fitted on its labelled example answers (with an embedder; the rules alone without one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..harm import DEFAULT_RULES, HarmDetector, RuleSet  # noqa: F401 - RuleSet and DEFAULT_RULES: where they were
from ..records import Group
from .base import ScoreContext, ScoreResult, register


@register("safety", needs=("safety_rules", "species"), uses=("embedder",))  # without one: the rules alone
class SafetyScorer:
    """0 when an answer gives harmful advice about wildlife (naming the rule or the examples' vote), else 1."""

    name = "safety"

    def __init__(self, safety_rules: str | Path | None = None, species: Iterable[str] = (), embedder=None):
        self.detector = HarmDetector.load(safety_rules, species, embedder)
        self.rules = self.detector.rules

    def score(self, group: Group, context: ScoreContext) -> ScoreResult:
        verdicts = self.detector.answers([c.text for c in group.completions], context.question)
        details = [{"rule": v.rule, "clause": v.clause, "vote": v.vote} if v.harmful else {"vote": v.vote}
                   for v in verdicts]
        return ScoreResult(self.name, [0.0 if v.harmful else 1.0 for v in verdicts], [v.reason() for v in verdicts],
                           details)
