"""The chat the agent sends its policy: the question with the retrieved facts (and, in training-free mode,
lessons learned). One place, so the agent, the loop and the benchmarks ask the same way."""

from __future__ import annotations

from typing import Sequence

from .records import Passage

SYSTEM = (
    "You are a helpful assistant for wildlife conservation. Answer the question in one or two short "
    "sentences, using the facts given when they are relevant. Never advise anything that would harm wildlife."
)


def facts_block(passages: Sequence[Passage]) -> str:
    """The facts as the policy reads them: a "Facts:" heading and one passage a line."""
    return "Facts:\n" + "\n".join(f"- {p.text}" for p in passages)


def answer_messages(question: str, passages: Sequence[Passage] = (), lessons: Sequence[str] = (),
                    system: str = SYSTEM) -> list[dict]:
    """System prompt, then a user turn holding the facts, any lessons, and the question."""
    parts = []
    if passages:
        parts.append(facts_block(passages))
    if lessons:
        parts.append("Lessons from earlier answers:\n" + "\n".join(f"- {lesson}" for lesson in lessons))
    parts.append(f"Question: {question}")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]
