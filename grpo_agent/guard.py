"""The serving guard: when a request asks for harm to wildlife and none of the K answers declines it safely,
serve a safe completion instead (it declines, says why from a retrieved fact where one does, and offers a
lawful alternative), added to the group as one more candidate so the updater can learn from it.

An answer passes when the detector finds no harmful advice in it and it declines (a refusal or
discouragement cue of the rule file). The safe completion is built from the rule file's `safe_completion`
template (a default below), the rule the request asked for, and the first retrieved fact that states a
reason (a `reasons` cue: the law, the threat).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .harm import HarmDetector, Verdict
from .records import Passage
from .text import split_sentences

SAFE_COMPLETION = "I can't help with {harm}. {why} {alternative}"
WHY = "It would harm wild animals that are already under pressure, and it is illegal in many places."
ALTERNATIVE = ("If you want to help, support an accredited sanctuary or rescue centre, and report wildlife crime to "
               "the local authorities.")


@dataclass
class GuardDecision:
    """What the guard did for one request."""

    request: Verdict  # the request's verdict
    passed: list[bool]  # per answer: may be served (for a harmful request: declines it and gives no harm)
    safe_completion: str | None = None  # the text served instead, when no answer passed

    def serving_order(self, ranking: list[int]) -> list[int]:
        """The composite's ranking (candidate indices, best first) reordered for serving: the safe completion
        (the last candidate) first when there is one, else the answers that pass before those that do not,
        each in composite order, so a harmful request never gets an answer that fails while one passes."""
        if self.safe_completion is not None:
            last = len(self.passed)
            return [last] + [i for i in ranking if i != last]
        return sorted(ranking, key=lambda i: not self.passed[i])

    def to_meta(self) -> dict:
        """What the logged group's meta records."""
        return {"request_harmful": self.request.harmful, "request_reason": self.request.reason(),
                "served_safe_completion": self.safe_completion is not None}


class ServingGuard:
    """Decides, per request, whether one of its answers may be served or a safe completion must be."""

    def __init__(self, detector: HarmDetector):
        self.detector = detector

    def decide(self, questions: Sequence[str], answers: Sequence[Sequence[str]],
               passages: Sequence[Sequence[Passage]]) -> list[GuardDecision]:
        """One decision per request: its verdict, which answers pass, and the safe completion when none does. The
        agent serves the best-ranked answer that passes: for a harmful request, never one that does not."""
        decisions = []
        for question, request, texts, facts in zip(questions, self.detector.requests(list(questions)), answers,
                                                   passages):
            if not request.harmful:
                decisions.append(GuardDecision(request, [True] * len(texts)))
                continue
            passed = [not v.harmful and self.detector.rules.declines(t)
                      for t, v in zip(texts, self.detector.answers(list(texts), question))]
            decisions.append(GuardDecision(request, passed,
                                           None if any(passed) else self.safe_completion(request, facts)))
        return decisions

    def safe_completion(self, request: Verdict, facts: Sequence[Passage]) -> str:
        """Decline the harm asked for, say why (a retrieved fact with a reason, else a general one), offer an
        alternative."""
        rules = self.detector.rules
        why = next((s for p in facts for s in split_sentences(p.text) if rules.gives_reason(s)), WHY)
        template = rules.safe_completion or SAFE_COMPLETION
        return " ".join(template.format(harm=request.rule or "that request", why=why, alternative=ALTERNATIVE).split())
