"""The scorer interface and registry: every signal scores a whole group, one score in [0, 1] per answer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..errors import ConfigError
from ..records import Group, Passage


@dataclass
class ScoreContext:
    """What a scorer may look at besides the answers: the question and the retrieved facts."""

    question: str
    passages: list[Passage] = field(default_factory=list)  # facts retrieved for this task, best first


@dataclass
class ScoreResult:
    """One signal's verdict on a group: a score in [0, 1] (or NaN: unscorable) and a reason per answer."""

    name: str
    scores: list[float]
    explanations: list[str]
    details: list[dict[str, Any]] = field(default_factory=list)  # per answer, signal-specific (e.g. support map)

    def __post_init__(self) -> None:
        if len(self.explanations) != len(self.scores):
            raise ValueError(f"{self.name}: {len(self.scores)} scores but {len(self.explanations)} explanations")
        for s in self.scores:
            if not math.isnan(s) and not 0.0 <= s <= 1.0:
                raise ValueError(f"{self.name}: score {s} is outside [0, 1]")


class Scorer(Protocol):
    """Anything with a name that scores a group of completions."""

    name: str

    def score(self, group: Group, context: ScoreContext) -> ScoreResult: ...


_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Register a scorer factory under `name` (a class or a function returning a Scorer)."""

    def deco(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"a scorer named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def registered() -> list[str]:
    """Names of every registered scorer."""
    return sorted(_REGISTRY)


def make_scorer(name: str, **kwargs: Any) -> Scorer:
    """Build the scorer registered as `name`; an unknown name lists the known ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown scorer {name!r}: registered scorers are {', '.join(registered())}")
    return _REGISTRY[name](**kwargs)
