"""The scorer interface and registry: every signal scores a whole group, one score in [0, 1] per answer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from ..errors import ConfigError
from ..records import Group, Passage


@dataclass
class ScoreContext:
    """What a scorer may look at besides the answers: the question, the retrieved facts and, for a task made from
    the corpus, the answer its passage states."""

    question: str
    passages: list[Passage] = field(default_factory=list)  # facts retrieved for this task, best first
    reference: str | None = None  # the answer span of a task made from the corpus (tasks.py), when it has one


@dataclass
class ScoreResult:
    """One signal's verdict on a group: a score in [0, 1] (or NaN: unscorable) and a reason per answer."""

    name: str
    scores: list[float]
    explanations: list[str]
    details: list[dict[str, Any]] = field(default_factory=list)  # per answer, signal-specific (e.g. support map)
    applicable: bool = True  # False: the signal does not apply to this task; left out of its composite quietly

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


RESOURCES = ("embedder", "judge", "safety_rules", "species", "verifier")  # what build_self_scorer can hand a scorer
_REGISTRY: dict[str, Callable[..., Scorer]] = {}
_NEEDS: dict[str, tuple[str, ...]] = {}
_USES: dict[str, tuple[str, ...]] = {}  # optional resources: passed when available


def register(name: str, needs: Sequence[str] = (), uses: Sequence[str] = ()
             ) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Register a scorer factory under `name` (a class or a function returning a Scorer); `needs` names the
    resources (of RESOURCES) that build_self_scorer must pass it, `uses` those it takes when they are available,
    each as a keyword argument of the same name."""
    for key, value in (("needs", needs), ("uses", uses)):
        if isinstance(value, str):
            raise ValueError(f"scorer {name!r}: {key}={value!r} is a string; give a tuple, e.g. {key}=({value!r},)")
        unknown = [r for r in value if r not in RESOURCES]
        if unknown:
            raise ValueError(f"scorer {name!r} {key} unknown resources {unknown}: choose from {', '.join(RESOURCES)}")

    def deco(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"a scorer named {name!r} is already registered")
        _REGISTRY[name] = factory
        _NEEDS[name], _USES[name] = tuple(needs), tuple(uses)
        return factory

    return deco


def registered() -> list[str]:
    """Names of every registered scorer."""
    return sorted(_REGISTRY)


def _check_known(name: str) -> None:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown scorer {name!r}: registered scorers are {', '.join(registered())}")


def needs_of(name: str) -> tuple[str, ...]:
    """The resources the scorer registered as `name` declared it needs."""
    _check_known(name)
    return _NEEDS[name]


def uses_of(name: str) -> tuple[str, ...]:
    """The resources the scorer registered as `name` takes when they are available."""
    _check_known(name)
    return _USES[name]


def make_scorer(name: str, **kwargs: Any) -> Scorer:
    """Build the scorer registered as `name`; an unknown name lists the known ones."""
    _check_known(name)
    return _REGISTRY[name](**kwargs)
