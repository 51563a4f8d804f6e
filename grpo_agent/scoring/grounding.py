"""Factual grounding: how well an answer is supported by the facts retrieved for its question.

The passages arrive in retrieval order, and the first is the anchor: the passage most relevant to the
question. Support found in the anchor counts fully; support found only in another retrieved passage counts
`other_weight` (a wrong answer can match a distractor passage well). Three parts, averaged:
  answer    cosine between the whole answer and the facts (anchor, or another passage discounted);
  content   share of the answer's new content words (not in the question) that the facts state;
  claims    each claim (sentence) matched to its best passage by cosine, times (1 - unsupported_penalty)
            for every number or name it states that no retrieved passage (nor the question) states.
Details name the passage that supports each claim and what no passage supports.
"""

from __future__ import annotations

import math

import numpy as np

from ..records import Group
from ..retrieval import Embedder
from .base import ScoreContext, ScoreResult, register
from .claims import content_stems, names, numbers, split_claims


@register("grounding", needs=("embedder",))
class GroundingScorer:
    """Support of each answer by the retrieved passages, anchored on the most relevant one, in [0, 1]."""

    name = "grounding"
    needs_passages = True  # an answer with no facts to check it against grounds nothing

    def __init__(self, embedder: Embedder, other_weight: float = 0.3, unsupported_penalty: float = 0.5):
        self.embedder = embedder
        self.other_weight = other_weight  # weight of support found only outside the anchor passage
        self.unsupported_penalty = unsupported_penalty  # claim support lost per unsupported number/name

    def _anchored(self, sims: np.ndarray) -> np.ndarray:
        """(N, P) similarities to the passages -> (N,) support, the anchor (column 0) counting fully."""
        others = sims[:, 1:].max(axis=1) if sims.shape[1] > 1 else np.zeros(len(sims))
        return np.clip(np.maximum(sims[:, 0], self.other_weight * others), 0.0, 1.0)

    def score(self, group: Group, context: ScoreContext) -> ScoreResult:
        k = len(group.completions)
        if not context.passages:
            reason = "no retrieved facts to ground against"
            return ScoreResult(self.name, [math.nan] * k, [reason] * k, [{} for _ in range(k)])
        passages = context.passages
        # Numbers and names count as supported when a passage (or the question itself) states them.
        corpus_text = " ".join([context.question, *(p.text for p in passages)]).lower()
        corpus_numbers = numbers(corpus_text)
        question_words = set(content_stems(context.question))
        passage_words = [set(content_stems(p.text)) for p in passages]
        answers = [c.text for c in group.completions]
        claims = [split_claims(a) or ([a] if a.strip() else []) for a in answers]
        flat = [c for cs in claims for c in cs]
        vectors = self.embedder.encode(answers + flat + [p.text for p in passages])
        answer_vecs, claim_vecs, passage_vecs = np.split(vectors, [k, k + len(flat)])
        answer_support = self._anchored(answer_vecs @ passage_vecs.T)  # (K,)
        claim_sims = claim_vecs @ passage_vecs.T  # (C, P)
        claim_support = self._anchored(claim_sims) if len(flat) else np.zeros(0)

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
                best = int(claim_sims[row].argmax())
                unsupported = sorted(numbers(claim) - corpus_numbers) + sorted(
                    n for n in names(claim) if n not in corpus_text
                )
                value = float(claim_support[row]) * (1 - self.unsupported_penalty) ** len(unsupported)
                support.append({"claim": claim, "passage_id": passages[best].id,
                                "similarity": round(float(claim_sims[row, best]), 4),
                                "unsupported": unsupported, "support": round(value, 4)})
                row += 1
            new_words = [w for w in content_stems(answers[i]) if w not in question_words]
            content = float(np.mean([
                1.0 if w in passage_words[0] else self.other_weight if any(w in p for p in passage_words[1:]) else 0.0
                for w in new_words
            ])) if new_words else 0.0
            claim_score = float(np.mean([s["support"] for s in support]))
            score = float(np.clip((answer_support[i] + content + claim_score) / 3, 0.0, 1.0))
            scores.append(score)
            missing = sorted({u for s in support for u in s["unsupported"]})
            explanations.append(
                f"answer-fact cosine {answer_support[i]:.2f}, new content in the facts {content:.2f}, "
                f"{len(support)} claims with mean support {claim_score:.2f}"
                + (f"; not in the facts: {', '.join(missing)}" if missing else "")
            )
            details.append({"claims": support, "answer_support": round(float(answer_support[i]), 4),
                            "content_support": round(content, 4)})
        return ScoreResult(self.name, scores, explanations, details)
