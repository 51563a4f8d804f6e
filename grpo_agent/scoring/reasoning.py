"""Reasoning quality judged by a model: P(yes) / (P(yes) + P(no)) for "is this answer correct and supported
by the facts?", read from the judge's next-token distribution, all K answers in one batched forward pass.
No free text is generated or parsed.

The judge is the policy itself by default, or a larger configured model. BENCHMARKS.md reports how well
each judge separates right from wrong answers; a 135M policy judging itself is near chance, which is why
this signal's default weight is 0 until a capable judge is configured.
"""

from __future__ import annotations

import math

import torch

from ..records import Group
from .base import ScoreContext, ScoreResult, register

JUDGE_SYSTEM = "You check answers to questions about wildlife against facts. Reply with one word: yes or no."
JUDGE_PROMPT = (
    "Facts:\n{facts}\n\nQuestion: {question}\n\nAnswer: {answer}\n\n"
    "Is the answer correct, supported by the facts, and sensibly reasoned? Reply yes or no."
)


def _answer_token_ids(tokenizer, yes: list[str], no: list[str]) -> tuple[list[int], list[int]]:
    """First tokens of the spellings of yes and of no, minus any token both share (e.g. a bare space)."""
    def first(words: list[str]) -> set[int]:
        return {enc[0] for w in words if (enc := tokenizer.encode(w, add_special_tokens=False))}

    y, n = first(yes), first(no)
    return sorted(y - n), sorted(n - y)


@register("reasoning", needs=("judge",))
class ReasoningJudge:
    """A model's yes/no verdict on each answer, as a probability."""

    name = "reasoning"

    def __init__(self, judge, max_facts: int = 3, max_answer_chars: int = 1200):
        self.judge = judge  # a Policy (anything with next_token_logprobs(messages_batch) and a tokenizer)
        self.max_facts = max_facts
        self.max_answer_chars = max_answer_chars
        tok = judge.tokenizer
        self.yes_ids, self.no_ids = _answer_token_ids(
            tok, ["yes", "Yes", " yes", " Yes", "YES"], ["no", "No", " no", " No", "NO"]
        )
        if not self.yes_ids or not self.no_ids:
            raise ValueError(f"the judge's tokenizer does not tell 'yes' {self.yes_ids} from 'no' {self.no_ids}")

    def messages(self, question: str, facts: list[str], answer: str) -> list[dict]:
        facts_text = "\n".join(f"- {f}" for f in facts[: self.max_facts]) or "- (none retrieved)"
        return [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_PROMPT.format(
                facts=facts_text, question=question, answer=answer[: self.max_answer_chars])},
        ]

    def score(self, group: Group, context: ScoreContext) -> ScoreResult:
        facts = [p.text for p in context.passages]
        texts = [c.text for c in group.completions]
        batch = [self.messages(context.question, facts, t) for t in texts]
        logp = self.judge.next_token_logprobs(batch)  # (K, V)
        p_yes = torch.logsumexp(logp[:, self.yes_ids], dim=-1).exp()
        p_no = torch.logsumexp(logp[:, self.no_ids], dim=-1).exp()
        scores, explanations = [], []
        for text, y, n in zip(texts, p_yes.tolist(), p_no.tolist()):
            if not text.strip():
                scores.append(0.0)
                explanations.append("empty answer")
            elif y + n <= 0 or math.isnan(y + n):
                scores.append(math.nan)
                explanations.append("the judge put no probability on yes or no")
            else:
                scores.append(y / (y + n))
                explanations.append(f"P(yes) {y:.3f}, P(no) {n:.3f}")
        return ScoreResult(self.name, scores, explanations)
