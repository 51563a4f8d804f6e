"""Composite score, ranking and group-relative advantages.

composite_i = sum_s w_s * score_s,i / sum_s w_s over the weighted signals s that scored the group, times
the score of each gate signal (safety by default: a harmful answer's composite is 0), so it stays in [0, 1]. A NaN or missing score never propagates: it is reported and replaced by the group minimum of that
signal (an unscorable answer earns no credit over its peers).

Advantages follow TRL's GRPO (scale_rewards) and Dr. GRPO:
    group:  A_i = (r_i - mean_g) / (std_g + eps)       std over the group (unbiased, as torch.std)
    batch:  A_i = (r_i - mean_g) / (std_batch + eps)   std over every reward in the batch
    none:   A_i =  r_i - mean_g                        Dr. GRPO: no std scaling
A group whose rewards do not vary (std_g <= tol) carries no signal: it is flagged and its advantages are 0,
so the updater can skip it without a backward pass.

Length and repetition penalties (collapse guards, off by default) scale the composite down:
    penalty_i   = min(1, length_penalty * max(0, 1 - words_i / min_answer_words)
                         + repetition_penalty * share of answer i's word 3-grams that repeat an earlier one)
    composite_i = composite_i * (1 - penalty_i)
so answering shorter or repeating itself costs an answer in proportion; a group of equally short answers
keeps its order (and its signal), and the composite stays in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..config import SCALES
from ..errors import ConfigError
from ..text import repetition
from .base import ScoreResult


@dataclass
class GroupScores:
    """The scored group: cleaned per-signal scores, the composite, the ranking and any problems met."""

    signals: dict[str, list[float]]
    composite: list[float]
    ranking: list[int]  # completion indices, best first (ties keep sampling order)
    problems: list[str] = field(default_factory=list)
    explanations: dict[str, list[str]] = field(default_factory=dict)  # signal -> one reason per completion

    @property
    def best(self) -> int:
        return self.ranking[0]


def combine(
    results: Sequence[ScoreResult], weights: dict[str, float], k: int, gates: Sequence[str] = ()
) -> GroupScores:
    """Weighted composite of the signals' scores for a group of k completions; each gate signal (e.g.
    safety) multiplies the composite instead of adding to it, so a 0 there vetoes the answer."""
    problems: list[str] = []
    signals: dict[str, list[float]] = {}
    for result in results:
        if not result.applicable:  # e.g. answer_match on a task without a corpus answer
            continue
        scores = list(result.scores) + [math.nan] * (k - len(result.scores))
        if len(result.scores) != k:
            problems.append(f"{result.name}: {len(result.scores)} scores for {k} completions")
        bad = [i for i, s in enumerate(scores[:k]) if s is None or math.isnan(s)]
        good = [s for i, s in enumerate(scores[:k]) if i not in bad]
        if not good:
            problems.append(f"{result.name}: no completion could be scored; signal left out of the composite")
            continue
        if bad:
            problems.append(f"{result.name}: completions {bad} unscorable, given the group minimum {min(good):.3f}")
        signals[result.name] = [min(good) if i in bad else s for i, s in enumerate(scores[:k])]
    used = {name: weights.get(name, 0.0) for name in signals if name not in gates}
    total = sum(used.values())
    if total <= 0:
        raise ConfigError(
            f"no scored signal has a positive weight (signals {sorted(signals)}, weights {weights}): "
            "give at least one signal a weight > 0 in [scoring.weights]"
        )
    composite = [sum(used[n] * signals[n][i] for n in used) / total for i in range(k)]
    for gate in gates:
        if gate in signals:
            composite = [c * g for c, g in zip(composite, signals[gate])]
    ranking = sorted(range(k), key=lambda i: -composite[i])
    return GroupScores(signals=signals, composite=composite, ranking=ranking, problems=problems)


def penalties(texts: Sequence[str], length_penalty: float = 0.0, min_answer_words: int = 8,
              repetition_penalty: float = 0.0) -> list[float]:
    """What each answer loses for being short (under min_answer_words words) or repetitive."""
    out = []
    for text in texts:
        short = max(0.0, 1.0 - len(text.split()) / min_answer_words) if min_answer_words else 0.0
        out.append(min(1.0, length_penalty * short + repetition_penalty * repetition(text)))
    return out


def apply_penalties(scored: GroupScores, penalty: Sequence[float]) -> None:
    """Scale the composite by (1 - penalty), re-rank, and report the penalties as a signal."""
    scored.composite = [c * (1.0 - p) for c, p in zip(scored.composite, penalty)]
    scored.ranking = sorted(range(len(scored.composite)), key=lambda i: -scored.composite[i])
    scored.signals["penalty"] = list(penalty)


def group_advantages(
    rewards: Sequence[Sequence[float]], scale: str = "group", eps: float = 1e-4, tol: float = 1e-6
) -> tuple[list[list[float]], list[bool]]:
    """Advantages for a batch of groups (one list of rewards per group) and a zero-variance flag per group."""
    if scale not in SCALES:
        raise ConfigError(f"scoring.scale = {scale!r}: choose one of {', '.join(SCALES)}")
    flat = [r for g in rewards for r in g]
    batch_std = torch.tensor(flat, dtype=torch.float64).std().item() if len(flat) > 1 else 0.0
    advantages, flat_groups = [], []
    for g in rewards:
        r = torch.tensor(list(g), dtype=torch.float64)  # (K,)
        std = r.std().item() if len(r) > 1 else 0.0
        if std <= tol:
            advantages.append([0.0] * len(r))
            flat_groups.append(True)
            continue
        centred = r - r.mean()
        if scale == "group":
            centred = centred / (std + eps)
        elif scale == "batch":
            centred = centred / (batch_std + eps)
        advantages.append(centred.tolist())
        flat_groups.append(False)
    return advantages, flat_groups


def blend_feedback(composite: Sequence[float], ratings: dict[int, float], weight: float) -> list[float]:
    """A group's composites with clients' ratings blended in as one more signal: a rated completion's
    composite becomes (1 - weight) * composite + weight * rating (its mean rating); others are unchanged."""
    return [(1 - weight) * c + weight * ratings[i] if i in ratings else c for i, c in enumerate(composite)]
