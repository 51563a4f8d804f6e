"""Plain records shared across modules: what the sampler produces and the rest of the pipeline reads."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass
class Completion:
    """One sampled answer: its token ids exactly as sampled, with their log-probs."""

    text: str  # decoded answer, special tokens removed (for people and scorers, never for training)
    token_ids: list[int]  # sampled ids, including the stop token when finish_reason is "stop"
    logprobs: list[float]  # log p(token) under softmax(logits / temperature), one per token id
    finish_reason: FinishReason  # "stop": a stop token was sampled; "length": max_new_tokens was reached
    scores: dict[str, float] = field(default_factory=dict)  # per-signal scores in [0, 1], once scored
    composite: float | None = None  # weighted composite of the scores
    advantage: float | None = None  # group-relative advantage of the composite
    # A multi-turn episode (episodes.py): token_ids run from the prompt's end through every turn, the tokens fed
    # back between the policy's turns (a tool's result, the turn markers) included; mask says which ids the policy
    # sampled (1: trained on, with their sampled log-probs) and which it was fed (0: log-prob 0, never trained on).
    mask: list[int] | None = None  # None: every token id was sampled (a single answer)
    turns: list[dict] | None = None  # the episode's turns as text ({"role", "content", ...}): for people and scorers

    @property
    def sampled_tokens(self) -> int:
        """How many of its token ids the policy sampled."""
        return len(self.token_ids) if self.mask is None else sum(self.mask)


@dataclass
class Group:
    """K completions sampled for one prompt by one policy version."""

    messages: list[dict]  # the chat the prompt was built from
    prompt_token_ids: list[int]  # the prompt after the chat template, as fed to the model
    completions: list[Completion] = field(default_factory=list)
    policy_version: str = "base"  # which weights sampled the group
    temperature: float = 1.0  # the temperature the log-probs were taken at
    zero_variance: bool = False  # scores did not vary within the group: no signal, the updater skips it
    group_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # what the store logged beside the group (None until read back from a store); not part of its identity
    info: GroupInfo | None = field(default=None, compare=False, repr=False)

    @property
    def guarded(self) -> bool:
        """Whether its last completion is the serving guard's safe completion, not a sample (guard.py)."""
        return self.info is not None and bool((self.info.meta.get("guard") or {}).get("served_safe_completion"))

    @property
    def sampled(self) -> list[Completion]:
        """The completions the policy sampled (the guard's safe completion left out): what monitors measure."""
        return self.completions[:-1] if self.guarded else self.completions

    def served(self) -> int:
        """The index of the completion the agent served: the guard's safe completion, or the answer it chose for a
        harmful request (as logged), else the top composite (ties: the first)."""
        if self.guarded:
            return len(self.completions) - 1
        chosen = (self.info.meta.get("guard") or {}).get("served") if self.info is not None else None
        if isinstance(chosen, int) and 0 <= chosen < len(self.completions):
            return chosen
        comp = [c.composite if c.composite is not None else 0.0 for c in self.completions]
        return max(range(len(comp)), key=lambda j: (comp[j], -j))


@dataclass
class GroupInfo:
    """What a store keeps beside a logged group."""

    prompt: str  # the question as asked
    passage_ids: list[str]  # the facts retrieved for it, best first
    config_hash: str  # config.config_hash of the setup that sampled and scored it
    task_id: str | None  # the task file's id, when it came from one
    source: str  # who logged it: agent, loop, collect, server
    meta: dict  # anything else the caller logged (e.g. the loop's round)
    created: float  # time.time() when logged


@dataclass
class Feedback:
    """A client's rating of a logged answer (POST /v1/feedback)."""

    index: int | None  # the completion rated; None: the answer that was served (the group's top composite)
    rating: float  # in [0, 1]
    text: str = ""
    created: float = 0.0  # time.time() when reported


@dataclass
class UpdateRecord:
    """One policy update as the store records it, with the groups it consumed."""

    id: int
    created: float  # time.time() when recorded
    round: int  # the loop's round (0 for `grpo-agent update`)
    policy_version: str  # the version served after it
    group_ids: list[str]  # the groups it trained on
    metrics: dict  # the round's update and monitors in a few numbers
    eval: dict | None  # the eval that gated it (rundir.EvalResult.to_dict()), if any
    promoted: bool
    reason: str  # why it was promoted or rolled back
    checkpoint: str  # where its weights (or lessons) were saved


@dataclass
class Lesson:
    """A lesson of the training-free mode's library."""

    lesson_id: str
    text: str
    origin_groups: list[str] = field(default_factory=list)  # the groups it was learned or revised from
    created: float = 0.0  # time.time()
    updated: float = 0.0


@dataclass
class Passage:
    """A short text from the plugged-in corpus, with where it came from."""

    id: str  # unique within an index
    text: str
    source: str = ""  # a citation: the assessing body and year, a file path, a URL
    metadata: dict = field(default_factory=dict)  # anything else (species, topic, path, position)


@dataclass
class Hit:
    """A passage returned by a search, with its cosine similarity to the query."""

    passage: Passage
    score: float
