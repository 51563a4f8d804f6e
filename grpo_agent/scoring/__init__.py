"""Self-evaluation: score a group of K answers with no reward model and no labels.

Signals (one module each, registered by name): consistency, grounding, reasoning, safety, education,
alignment (the safety reward conditioned on the request), answer_match (the corpus answer of a task made
from the documents), verifier (a cross-encoder learned from corpus-made tasks).
A signal declares the resources it needs when it registers (`@register("grounding", needs=("embedder",))`)
and `build_self_scorer` hands each configured signal those. `SelfScorer` runs the signals on a group,
combines them (composite.py) and writes each completion's scores, composite and advantage; `rescore`
blends clients' ratings into them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

from ..config import ScoringConfig
from ..errors import ConfigError
from ..records import Feedback, Group, Passage
from . import alignment, answer_match, consistency, education, grounding, reasoning, safety, verifier  # noqa: F401 - registers the scorers
from .base import RESOURCES, ScoreContext, Scorer, ScoreResult, make_scorer, needs_of, register, registered, uses_of
from .composite import GroupScores, apply_penalties, blend_feedback, combine, group_advantages, penalties

__all__ = [
    "RESOURCES", "GroupScores", "ScoreContext", "ScoreResult", "Scorer", "SelfScorer", "apply_penalties",
    "blend_feedback", "build_self_scorer", "combine", "group_advantages", "make_scorer", "needs_of", "penalties",
    "register", "registered", "scorer_needs", "uses_of",
]

# How to make each resource available when a configured signal needs it.
_FIXES = {
    "embedder": "pass build_self_scorer an embedder (GRPOAgent.from_config loads retrieval.embedder)",
    "judge": 'pass build_self_scorer a judge model (GRPOAgent.from_config loads scoring.judge: "policy" or a '
             "model directory)",
    "verifier": "train one with `grpo-agent verifier --index DIR --out DIR` and set scoring.verifier to that "
                "directory",
}


class SelfScorer:
    """Runs the signals on groups, combines them and computes group-relative advantages."""

    def __init__(self, scorers: Sequence[Scorer], weights: dict[str, float], gates: Iterable[str] = (),
                 scale: str = "group", eps: float = 1e-4, length_penalty: float = 0.0, min_answer_words: int = 8,
                 repetition_penalty: float = 0.0, feedback_weight: float = 0.5):
        self.scorers = list(scorers)
        self.weights = dict(weights)
        self.gates = tuple(gates)
        self.scale, self.eps = scale, eps
        self.penalty = {"length_penalty": length_penalty, "min_answer_words": min_answer_words,
                        "repetition_penalty": repetition_penalty}
        self.feedback_weight = feedback_weight  # weight of clients' ratings blended into a composite (rescore)

    @property
    def detector(self):
        """The harm detector (harm.HarmDetector) its safety or alignment signal carries; None without one."""
        return next((s.detector for s in self.scorers if hasattr(s, "detector")), None)

    def score_group(self, group: Group, context: ScoreContext) -> tuple[GroupScores, list[ScoreResult]]:
        """Score one group and write each completion's per-signal scores and composite."""
        results = [s.score(group, context) for s in self.scorers]
        return self._combine(group, results), results

    def _combine(self, group: Group, results: Sequence[ScoreResult], extra: Sequence[float] = ()) -> GroupScores:
        """The signals' composite, less the penalties (and `extra` ones, per completion), written to each
        completion with its per-signal scores."""
        k = len(group.completions)
        scored = combine(results, self.weights, k, gates=self.gates)
        penalty = [0.0] * k
        if self.penalty["length_penalty"] or self.penalty["repetition_penalty"]:
            penalty = penalties([c.text for c in group.completions], **self.penalty)
        penalty = [min(1.0, p + x) for p, x in zip(penalty, list(extra) or [0.0] * k)]
        if any(penalty):
            apply_penalties(scored, penalty)
        scored.explanations = {r.name: r.explanations for r in results}
        for i, c in enumerate(group.completions):
            c.scores = {name: values[i] for name, values in scored.signals.items()}
            c.composite = scored.composite[i]
        return scored

    def score_episodes(self, group: Group, context: ScoreContext, retrieved: Sequence[Sequence[Passage]],
                       tool_error_penalty: float = 0.0) -> GroupScores:
        """Score a group of K multi-turn episodes (episodes.py) on their final answers and write each one's scores
        and composite. A signal that judges answers one by one sees the facts its own episode retrieved (grounding
        scores 0 for an episode that retrieved none: it grounds nothing); one that judges an answer against the
        others (consistency: `relative`) sees the whole group, with every fact any episode retrieved. Each tool
        error (an empty query) costs `tool_error_penalty` of the composite."""
        union = list({p.id: p for ps in retrieved for p in ps}.values())
        results = []
        for scorer in self.scorers:
            if getattr(scorer, "relative", False):
                results.append(scorer.score(group, dataclasses.replace(context, passages=union)))
                continue
            parts = []
            for c, facts in zip(group.completions, retrieved):
                if getattr(scorer, "needs_passages", False) and not facts:
                    parts.append(ScoreResult(scorer.name, [0.0], ["the episode retrieved no facts"], [{}]))
                    continue
                one = dataclasses.replace(group, completions=[c], info=None)
                parts.append(scorer.score(one, dataclasses.replace(context, passages=list(facts))))
            results.append(ScoreResult(scorer.name, [x.scores[0] for x in parts], [x.explanations[0] for x in parts],
                                       [x.details[0] if x.details else {} for x in parts],
                                       applicable=any(x.applicable for x in parts)))
        errors = [sum(1 for t in c.turns or () if t.get("error")) for c in group.completions]
        return self._combine(group, results, [tool_error_penalty * e for e in errors])

    def score_groups(self, groups: Sequence[Group], contexts: Sequence[ScoreContext]) -> list[GroupScores]:
        """Score a batch of groups and write advantages (the scale may span the batch)."""
        scored = [self.score_group(g, c)[0] for g, c in zip(groups, contexts)]
        self.assign_rewards(groups, [s.composite for s in scored])
        return scored

    def assign_rewards(self, groups: Sequence[Group], composites: Sequence[Sequence[float]]) -> None:
        """Write each completion's composite and its advantage over the batch (this scorer's scale and eps), and
        flag the groups whose composites do not vary."""
        if len(composites) != len(groups) or any(len(r) != len(g.completions) for g, r in zip(groups, composites)):
            raise ValueError(f"composites for {[len(r) for r in composites]} completions do not match groups of "
                             f"{[len(g.completions) for g in groups]}: give one composite per completion")
        advantages, flat = group_advantages(composites, self.scale, self.eps)
        for group, comp, adv, zero in zip(groups, composites, advantages, flat):
            group.zero_variance = zero
            for c, x, a in zip(group.completions, comp, adv):
                c.composite, c.advantage = x, a

    def rescore(self, groups: Sequence[Group], ratings: Mapping[str, Sequence[Feedback]]) -> int:
        """Blend clients' ratings (group_id -> feedback) into the rated completions' composites and recompute the
        batch's advantages; groups nobody rated keep their scores. Returns how many groups carried a rating."""
        composites, rated = [], 0
        for g in groups:
            comp = [c.composite if c.composite is not None else 0.0 for c in g.completions]
            by_index: dict[int, list[float]] = {}
            for f in ratings.get(g.group_id, ()):
                by_index.setdefault(g.served() if f.index is None else f.index, []).append(f.rating)
            rated += bool(by_index)
            composites.append(blend_feedback(comp, {i: sum(v) / len(v) for i, v in by_index.items()},
                                             self.feedback_weight))
        if rated and self.feedback_weight > 0:
            self.assign_rewards(groups, composites)
        return rated


def _active(cfg: ScoringConfig) -> list[str]:
    """The signals a config runs: those with a weight > 0, then the gates."""
    return [n for n, w in cfg.weights.items() if w > 0] + [g for g in cfg.gates if g not in cfg.weights]


def scorer_needs(cfg: ScoringConfig) -> set[str]:
    """The resources (embedder, judge, ...) that the configured signals (weighted or gated) need."""
    return {r for name in _active(cfg) for r in needs_of(name)}


def build_self_scorer(cfg: ScoringConfig, embedder=None, judge=None, species: Iterable[str] = (),
                      verifier=None) -> SelfScorer:
    """The SelfScorer the config asks for: signals with a weight (or a gate) are built, each given the resources
    it registered as needing; others are not built."""
    available: dict[str, Any] = {"safety_rules": cfg.safety_rules, "species": list(species)}
    available.update({k: v for k, v in (("embedder", embedder), ("judge", judge), ("verifier", verifier))
                      if v is not None})
    scorers = []
    for name in _active(cfg):
        missing = [r for r in needs_of(name) if r not in available]
        if missing:
            raise ConfigError(f"the {name} scorer needs {missing[0]!r}, which is not available: "
                              + _FIXES.get(missing[0], "pass it to build_self_scorer"))
        given = [*needs_of(name), *(r for r in uses_of(name) if r in available)]
        scorers.append(make_scorer(name, **{r: available[r] for r in given}))
    return SelfScorer(scorers, cfg.weights, cfg.gates, cfg.scale, cfg.eps, cfg.length_penalty, cfg.min_answer_words,
                      cfg.repetition_penalty, feedback_weight=cfg.feedback_weight)
