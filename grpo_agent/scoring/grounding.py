"""Factual grounding: how well an answer's claims are supported by the facts retrieved for the task.

Each claim (sentence) is matched to its most similar retrieved passage (cosine of embeddings). The numbers
and names the claim states must appear in some retrieved passage; every one that does not scales the
claim's support down. An answer's score blends its claims' mean support with the cosine between the whole
answer and its best passage (the whole-answer cosine alone separates right from wrong answers well, see
BENCHMARKS.md; the claim check adds the number and name test).
"""

from __future__ import annotations

import math

import numpy as np

from ..records import Group
from ..retrieval import Embedder
from .base import ScoreContext, ScoreResult, register
from .claims import names, numbers, split_claims


@register("grounding")
class GroundingScorer:
    """Support of each answer's claims by the retrieved passages, in [0, 1]."""

    name = "grounding"

    def __init__(self, embedder: Embedder, answer_weight: float = 0.5, unsupported_penalty: float = 0.5):
        self.embedder = embedder
        self.answer_weight = answer_weight  # share of the whole-answer cosine in the score
        self.unsupported_penalty = unsupported_penalty  # support lost per unsupported number/name (fraction)

    def score(self, group: Group, context: ScoreContext) -> ScoreResult:
        k = len(group.completions)
        if not context.passages:
            reason = "no retrieved facts to ground against"
            return ScoreResult(self.name, [math.nan] * k, [reason] * k, [{} for _ in range(k)])
        passages = context.passages
        # Numbers and names count as supported when a passage (or the question itself) states them.
        corpus_text = " ".join([context.question, *(p.text for p in passages)]).lower()
        corpus_numbers = numbers(corpus_text)
        answers = [c.text for c in group.completions]
        claims = [split_claims(a) or ([a] if a.strip() else []) for a in answers]
        flat = [c for cs in claims for c in cs]
        vectors = self.embedder.encode(answers + flat + [p.text for p in passages])
        answer_vecs, claim_vecs, passage_vecs = np.split(vectors, [k, k + len(flat)])
        answer_sims = answer_vecs @ passage_vecs.T  # (K, P)
        claim_sims = claim_vecs @ passage_vecs.T  # (C, P)

        scores, explanations, details = [], [], []
        row = 0
        for i, answer_claims in enumerate(claims):
            if not answer_claims:
                scores.append(0.0)
                explanations.append("empty answer")
                details.append({"claims": []})
                continue
            support = []
            for claim in answer_claims:
                sims = claim_sims[row]
                row += 1
                best = int(sims.argmax())
                stated_numbers = numbers(claim)
                stated_names = names(claim)
                unsupported = sorted(stated_numbers - corpus_numbers) + sorted(
                    n for n in stated_names if n not in corpus_text
                )
                value = max(0.0, float(sims[best])) * (1 - self.unsupported_penalty) ** len(unsupported)
                support.append({"claim": claim, "passage_id": passages[best].id, "similarity": round(float(sims[best]), 4),
                                "unsupported": unsupported, "support": round(value, 4)})
            claim_score = float(np.mean([s["support"] for s in support]))
            answer_score = max(0.0, float(answer_sims[i].max()))
            score = min(1.0, self.answer_weight * answer_score + (1 - self.answer_weight) * claim_score)
            scores.append(score)
            missing = sorted({u for s in support for u in s["unsupported"]})
            explanations.append(
                f"{len(support)} claims, mean support {claim_score:.2f}, answer-fact cosine {answer_score:.2f}"
                + (f"; not in the facts: {', '.join(missing)}" if missing else "")
            )
            details.append({"claims": support, "answer_similarity": round(answer_score, 4)})
        return ScoreResult(self.name, scores, explanations, details)
