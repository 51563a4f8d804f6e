"""Educational value: answers that explain why, restate retrieved facts, stay on topic and concise.

Four parts, each in [0, 1], averaged: explains (a causal connective), cites (the closest claim-to-fact
cosine), on topic (answer-question cosine), concise (length within [min_words, max_words]). Then
penalties multiply: an empty answer scores 0, a truncated one (finish_reason "length") loses half, and a
repetitive one loses the fraction of its word 3-grams that repeat.
"""

from __future__ import annotations

import re

import numpy as np

from ..records import Group
from ..retrieval import Embedder
from ..text import repetition
from .base import ScoreContext, ScoreResult, register
from .claims import split_claims

_EXPLAINS = re.compile(
    r"\b(because|since|due to|as a result|therefore|thus|so that|which means|this means|that is why|"
    r"this is why|leads? to|led to|causes?|caused|in order to|thanks to|results? in)\b",
    re.IGNORECASE,
)


def _ramp(x: float, lo: float, hi: float) -> float:
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


@register("education", needs=("embedder",))
class EducationScorer:
    """Explains, cites facts, on topic, concise; penalises empty, truncated and repetitive answers."""

    name = "education"

    def __init__(self, embedder: Embedder, min_words: int = 8, max_words: int = 120):
        self.embedder = embedder
        self.min_words, self.max_words = min_words, max_words

    def score(self, group: Group, context: ScoreContext) -> ScoreResult:
        texts = [c.text for c in group.completions]
        claims = [split_claims(t) or [t] for t in texts]
        flat = [c for cs in claims for c in cs]
        facts = [p.text for p in context.passages]
        vectors = self.embedder.encode([context.question, *texts, *flat, *facts])
        q, answers, claim_vecs, fact_vecs = np.split(vectors, np.cumsum([1, len(texts), len(flat)]))
        scores, explanations = [], []
        row = 0
        for i, (text, completion) in enumerate(zip(texts, group.completions)):
            n_claims = len(claims[i])
            sims = claim_vecs[row : row + n_claims] @ fact_vecs.T if len(facts) else np.zeros((n_claims, 1))
            row += n_claims
            n_words = len(text.split())
            if n_words == 0:
                scores.append(0.0)
                explanations.append("empty answer")
                continue
            explains = 1.0 if _EXPLAINS.search(text) else 0.0
            cites = _ramp(float(sims.max()), 0.3, 0.7)
            on_topic = _ramp(float(answers[i] @ q[0]), 0.1, 0.5)
            if n_words < self.min_words:
                concise = n_words / self.min_words
            else:
                concise = 1.0 - _ramp(n_words, self.max_words, 2 * self.max_words)
            score = (explains + cites + on_topic + concise) / 4
            notes = [f"explains {explains:.0f}", f"cites {cites:.2f}", f"on topic {on_topic:.2f}",
                     f"concise {concise:.2f} ({n_words} words)"]
            if completion.finish_reason == "length":
                score *= 0.5
                notes.append("truncated: x0.5")
            rep = repetition(text)
            if rep > 0:
                score *= 1.0 - rep
                notes.append(f"repetition {rep:.2f}")
            scores.append(float(np.clip(score, 0.0, 1.0)))
            explanations.append(", ".join(notes))
        return ScoreResult(self.name, scores, explanations)
