"""Self-consistency: how much each answer agrees with the other K-1 answers of its group.

Two answers agree 1 or 0 when a short final answer can be extracted from both (yes/no, a short span, a
single number: a vote), and by the cosine of their embeddings (clipped at 0) otherwise. An answer's score
is its mean agreement with the others.
"""

from __future__ import annotations

import math

import numpy as np

from ..records import Group
from ..retrieval import Embedder
from .base import ScoreContext, ScoreResult, register
from .claims import final_answer


@register("consistency", needs=("embedder",))
class ConsistencyScorer:
    """Mean agreement of each answer with the rest of its group, in [0, 1]."""

    name = "consistency"
    relative = True  # an answer's score depends on the rest of its group

    def __init__(self, embedder: Embedder):
        self.embedder = embedder

    def score(self, group: Group, context: ScoreContext) -> ScoreResult:
        texts = [c.text for c in group.completions]
        k = len(texts)
        if k < 2:
            return ScoreResult(self.name, [math.nan] * k, ["a single answer has nothing to agree with"] * k)
        finals = [final_answer(t) for t in texts]
        vectors = self.embedder.encode(texts)
        agree = np.clip(vectors @ vectors.T, 0.0, 1.0)  # (K, K)
        for i in range(k):
            for j in range(k):
                if finals[i] is not None and finals[j] is not None:
                    agree[i, j] = float(finals[i] == finals[j])
        scores, explanations = [], []
        for i in range(k):
            if not texts[i].strip():
                scores.append(0.0)
                explanations.append("empty answer")
                continue
            others = [agree[i, j] for j in range(k) if j != i]
            scores.append(float(np.mean(others)))
            if finals[i] is not None:
                votes = sum(1 for j in range(k) if j != i and finals[j] == finals[i])
                explanations.append(f"final answer {finals[i]!r} shared by {votes} of {k - 1} others")
            else:
                explanations.append(f"mean agreement {scores[-1]:.2f} with {k - 1} others (embedding)")
        return ScoreResult(self.name, scores, explanations)
