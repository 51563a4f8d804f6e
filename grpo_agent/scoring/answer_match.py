"""Does the answer state the task's corpus answer? For a task made from the user's documents
(grpo_agent/tasks.py), the span of the passage it asks for travels with it (ScoreContext.reference), so the
group can be judged against what the documents say: derived from the corpus, not from a human label.

An answer scores 1 when it states the reference as a whole-word phrase, not negated or qualified by the word
before it (evaluation.is_correct), else 0. A task without a reference (a user's own question) is not
applicable: the signal is left out of that group's composite.
"""

from __future__ import annotations

from ..evaluation import is_correct
from ..records import Group
from .base import ScoreContext, ScoreResult, register


@register("answer_match")
class AnswerMatchScorer:
    """1 when an answer states the corpus answer its task carries, else 0; not applicable without one."""

    name = "answer_match"

    def score(self, group: Group, context: ScoreContext) -> ScoreResult:
        texts = [c.text for c in group.completions]
        if not context.reference:
            return ScoreResult(self.name, [float("nan")] * len(texts), ["no corpus answer for this task"] * len(texts),
                               applicable=False)
        right = [is_correct(t, context.reference) for t in texts]
        return ScoreResult(self.name, [1.0 if r else 0.0 for r in right],
                           [("states" if r else "does not state") + f" the corpus answer {context.reference!r}"
                            for r in right])
