"""The learned verifier as a signal: a cross-encoder trained on corpus-made tasks (grpo_agent/verifier.py)
scores each answer, given the question and the facts retrieved for it, as the probability it is right. Unlike
answer_match it needs no answer span, so it scores the user's own questions too.
"""

from __future__ import annotations

from ..records import Group
from .base import ScoreContext, ScoreResult, register


@register("verifier", needs=("verifier",))
class VerifierScorer:
    """The learned verifier's probability that each answer is right."""

    name = "verifier"

    def __init__(self, verifier):
        self.verifier = verifier  # grpo_agent.verifier.Verifier

    def score(self, group: Group, context: ScoreContext) -> ScoreResult:
        texts = [c.text for c in group.completions]
        probs = self.verifier.score(context.question, [p.text for p in context.passages], texts)
        return ScoreResult(self.name, probs, [f"verifier: right with probability {p:.2f}" for p in probs])
