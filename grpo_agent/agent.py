"""The agent: retrieve facts, sample K answers, score them itself, serve the best and log the group.

    agent = GRPOAgent(policy, index, scorer, store, k=8)
    reply = agent.respond("Why are pangolins trafficked?")
    reply.answer, reply.group_id, reply.scores

With k=1 nothing is scored or logged (cheap serving). `follow(run_dir)` makes the agent load each adapter
the self-improvement loop promotes, between two requests, without a restart.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

from .config import EpisodeConfig, SamplingConfig
from .episodes import fed_back
from .errors import AgentError, ContextLengthError, LoopError
from .guard import GuardDecision, ServingGuard
from .prompts import SYSTEM, answer_messages
from .records import Completion, Group, Passage
from .rundir import RunDir
from .scoring import GroupScores, ScoreContext, SelfScorer
from .toolcalls import as_shown

Task = str | Sequence[dict]  # a question, or a chat (the last user message is the question)



@dataclass
class Answered:
    """A batch of tasks sampled, scored and guarded (agent.scored_groups): one entry per task in each list."""

    groups: list[Group]
    passages: list[list[Passage]]
    contexts: list[ScoreContext]
    scored: list[GroupScores | None]  # None when k = 1 (nothing scored)
    decisions: list[GuardDecision | None]  # None without a serving guard (or k = 1)


@dataclass
class Continued:
    """An episode a chat continues: the prompt its first turn was sampled from, every token id after it so far
    (sampled: mask 1; fed back: mask 0) with log-probs and turns, and the chat's turns around its last answer."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    mask: list[int]
    turns: list[dict]
    before: list[dict]  # the chat before the episode's last answer (for the chat template)
    new: list[dict]  # the turns after it: tool results, a user's reply
    fed: list[int] = field(default_factory=list)  # the new turns' token ids, once prompt_ids has rendered them

    def _fed(self, policy) -> list[int]:
        return fed_back(policy.tokenizer, as_shown(self.before), as_shown(self.new), self.tokens[-1],
                        policy.stop_token_ids)

    def prompt_ids(self, policy, max_new_tokens: int, limit: int | None, index: int = 0) -> list[int]:
        """What the next turn is sampled from: the episode so far and the new turns, fed back as the chat
        template renders them; ContextLengthError past the context."""
        self.fed = self._fed(policy)
        ids = self.prompt + self.tokens + self.fed
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise ContextLengthError(f"task {index}: the conversation so far is {len(ids)} tokens and max_new_tokens is "
                                     f"{max_new_tokens}, past the model's context of {limit}: start a new chat",
                                     index=index, prompt_tokens=len(ids), limit=limit)
        return ids

    def extend(self, group: Group) -> None:
        """Make each of the group's completions the whole episode: the earlier turns, the fed-back ones, then it."""
        fed, n = self.fed, len(self.fed)
        new_turns = [dict(m) for m in self.new]
        for c in group.completions:
            own = c.mask or [1] * len(c.token_ids)
            c.token_ids, c.logprobs = self.tokens + fed + c.token_ids, self.logprobs + [0.0] * n + c.logprobs
            c.mask = self.mask + [0] * n + own
            c.turns = self.turns + new_turns + [{"role": "assistant", "content": c.text}]
        group.prompt_token_ids = list(self.prompt)


@dataclass
class Reply:
    """The served answer, with the group it was chosen from."""

    answer: str
    group_id: str | None  # None when nothing was logged (k=1, or no store)
    best: int  # index of the served completion in `candidates`
    candidates: list[Completion]  # all K, with per-signal scores and composite once scored
    passages: list[Passage]  # the facts retrieved for the task, best first
    explanations: dict[str, list[str]] = field(default_factory=dict)  # signal -> one reason per candidate
    policy_version: str = "base"
    prompt_token_ids: list[int] = field(default_factory=list)  # the prompt as the model saw it
    guard: GuardDecision | None = None  # the serving guard's decision (None: no guard); see guard.py

    @property
    def guarded(self) -> bool:
        """Whether the served answer is the guard's safe completion (the last candidate), not a sampled one."""
        return self.guard is not None and self.guard.safe_completion is not None

    @property
    def scores(self) -> dict[str, float]:
        """The served answer's per-signal scores (empty when unscored)."""
        return self.candidates[self.best].scores

    @property
    def composite(self) -> float | None:
        return self.candidates[self.best].composite


def split_task(task: Task) -> tuple[str, list[dict]]:
    """The question and the other turns of a task (a string, or a chat whose last user message is the
    question); system turns are kept (the agent adds them to its own system prompt), and tool results too.

    The question is the last *user* turn: tool results that follow it are context, not a new question."""
    if isinstance(task, str):
        if not task.strip():
            raise AgentError("the task is empty: give a question")
        return task, []
    turns = [dict(m) for m in task]
    users = [i for i, m in enumerate(turns) if m.get("role") == "user"]
    if not users:
        raise AgentError("the chat has no user message: the last user message is the question to answer")
    last = users[-1]
    question = turns[last].get("content")
    if not isinstance(question, str) or not question.strip():
        raise AgentError("the last user message has no text content")
    history = [m for i, m in enumerate(turns) if i != last and m.get("role") in ("system", "user", "assistant", "tool")]
    return question, history


class GRPOAgent:
    """Answers tasks with the best of K self-scored samples and logs every group for the updater."""

    def __init__(self, policy, retriever=None, scorer: SelfScorer | None = None, store=None, k: int = 8,
                 sampling: SamplingConfig | None = None, top_k: int = 3, config_hash: str = "",
                 system: str = SYSTEM, experience=None, guard: ServingGuard | None = None):
        if k < 1:
            raise AgentError(f"k = {k}: sample at least one answer")
        if k > 1 and scorer is None:
            raise AgentError(f"k = {k} needs a scorer to pick the best answer (or use k=1 for plain serving)")
        self.policy, self.retriever, self.scorer, self.store = policy, retriever, scorer, store
        self.engine = policy  # what samples the groups: the policy in-process, or a RemoteEngine (rollout/engines.py)
        self.k, self.top_k, self.config_hash, self.system = k, top_k, config_hash, system
        self.sampling = sampling or SamplingConfig(k=k)
        self.experience = experience  # training-free mode: an ExperienceLibrary whose lessons go in the prompt
        self.guard = guard  # serves a safe completion when a harmful request gets no safe answer
        self.embedder = None  # set by from_config: the embedder of the index and scorers, for reuse
        self.config = None  # set by from_config: the Config it was wired from
        self.episodes = EpisodeConfig()  # multi-turn episodes with the search tool (episode_groups)
        self._followed: RunDir | None = None
        self._followed_version: str | None = None
        self._lock = threading.Lock()  # one request at a time on the model (the server may use threads)

    @classmethod
    def from_config(cls, cfg, store_path: str | os.PathLike | None = None, policy=None, index=None,
                    embedder=None) -> "GRPOAgent":
        """An agent wired as a Config says: its policy, fact index (retrieval.index), scorer and a store at
        `store_path` (None: nothing logged). Pass `policy`, `index` or `embedder` to reuse loaded ones."""
        from .config import config_hash
        from .rollout.policy import load_policy
        from .retrieval import Embedder, FactIndex
        from .scoring import build_self_scorer, scorer_needs
        from .store import TrajectoryStore

        needs = scorer_needs(cfg.scoring)  # what the configured signals registered as needing (before any loading)
        policy = policy or load_policy(cfg.policy)
        if embedder is None and (index is None and cfg.retrieval.index or "embedder" in needs):
            embedder = index.embedder if index is not None else Embedder(cfg.retrieval.embedder)
        if index is None and cfg.retrieval.index:
            index = FactIndex.load(cfg.retrieval.index, embedder)
        judge = None
        if "judge" in needs:
            judge = policy if cfg.scoring.judge == "policy" else load_policy(cfg.scoring.judge)
        verifier = None
        if "verifier" in needs and cfg.scoring.verifier:
            from .verifier import Verifier

            verifier = Verifier.load(cfg.scoring.verifier)
        species = sorted({p.metadata.get("species") for p in index.passages()} - {None}) if index else []
        scorer = build_self_scorer(cfg.scoring, embedder=embedder, judge=judge, species=species, verifier=verifier)
        store = TrajectoryStore(store_path) if store_path else None
        guard = ServingGuard(scorer.detector) if scorer.detector is not None and cfg.scoring.serving_guard else None
        agent = cls(policy, index, scorer, store, k=cfg.sampling.k, sampling=cfg.sampling,
                    top_k=cfg.retrieval.top_k, config_hash=config_hash(cfg), guard=guard)
        agent.embedder = embedder
        agent.config = cfg  # what Ray rollout workers rebuild the same agent from (rollout/workers.py)
        agent.episodes = cfg.episodes
        from .rollout.engines import rollout_engine

        agent.engine = rollout_engine(cfg.sampling.engine, policy)
        return agent

    def use_experience(self, cfg, store=None) -> None:
        """Training-free mode: keep a library of lessons (in `store`, default the agent's own) learned by this
        agent's model, and put the relevant ones into every prompt."""
        from .experience import ExperienceLibrary
        from .retrieval import Embedder

        store = store or self.store
        if store is None:
            raise AgentError("the lesson library lives in a trajectory store: give the agent a store")
        e = cfg.experience
        self.experience = ExperienceLibrary(store, getattr(self, "embedder", None) or Embedder(cfg.retrieval.embedder),
                                            self.policy, max_lessons=e.max_lessons, top_m=e.top_m, shown=e.shown,
                                            duplicate_cosine=e.duplicate_cosine, max_new_tokens=e.max_new_tokens)

    # ----- serving -------------------------------------------------------------------------------------
    def respond(self, task: Task, task_id: str | None = None, log: bool = True, **sampling: Any) -> Reply:
        """Answer one task (see respond_batch)."""
        return self.respond_batch([task], [task_id], log=log, **sampling)[0]

    def respond_batch(self, tasks: Sequence[Task], task_ids: Sequence[str | None] | None = None,
                      log: bool = True, source: str = "agent", meta: dict | None = None, learn: bool = False,
                      references: Sequence[str | None] | None = None,
                      continuing: Sequence["Continued | None"] | None = None, **sampling: Any) -> list[Reply]:
        """Answer tasks in one batched sampling call: retrieve, sample K each, score, rank, guard, log.

        `sampling` overrides SamplingConfig fields for this call (k, temperature, max_new_tokens, seed...).
        `learn`: in training-free mode, also learn lessons from the scored groups (after logging them).
        `references`: per task, the answer span of a task made from the corpus (the answer_match signal), or None.
        `continuing`: per task, the episode its chat continues (Continued: what this agent sampled for the chat's
        earlier turns), or None. A continued task is sampled from that episode's token ids and the new turns,
        and its group's completions are the whole episodes (episodes.py's layout), the earlier turns included.
        """
        if not tasks:
            return []
        task_ids = list(task_ids) if task_ids is not None else [None] * len(tasks)
        references = list(references) if references is not None else [None] * len(tasks)
        split = [split_task(t) for t in tasks]
        with self._lock:
            self._check_promoted()
            batch = self._answer(split, references, continuing, **sampling)
        entries = self.group_logs([q for q, _ in split], batch, task_ids, references, meta)
        replies = []
        for g, p, s, d, entry in zip(batch.groups, batch.passages, batch.scored, batch.decisions, entries):
            group_id = None
            best = s.ranking[0] if s is not None else 0
            if log and entry is not None and self.store is not None:
                group_id = self.store.log_group(**entry, config_hash=self.config_hash, source=source)
            replies.append(Reply(g.completions[best].text, group_id, best, g.completions, p,
                                 s.explanations if s is not None else {}, g.policy_version, g.prompt_token_ids, d))
        if learn and self.experience is not None and all(s is not None for s in batch.scored):
            with self._lock:
                self.experience.learn(batch.groups, batch.contexts, batch.scored)
        return replies

    def scored_groups(self, tasks: Sequence[Task], references: Sequence[str | None] | None = None,
                      **sampling: Any) -> "Answered":
        """What respond_batch serves, without logging: the groups sampled, scored and guarded (a guard's safe
        completion is one more candidate), with their passages, contexts, scores and guard decisions."""
        with self._lock:
            self._check_promoted()
            return self._answer([split_task(t) for t in tasks], references, **sampling)

    def answered(self, unit: str, tasks: Sequence[Task], references: Sequence[str | None] | None = None,
                 seed: int | None = None) -> "Answered":
        """Groups collected for training in the loop's unit (loop.unit): episode_groups for "episode" (with
        [episodes] explore), scored_groups for "answer"."""
        if unit == "episode":
            return self.episode_groups(tasks, references, seed=seed, explore=self.episodes.explore)
        return self.scored_groups(tasks, references, seed=seed)

    @staticmethod
    def group_logs(questions: Sequence[str], answered: "Answered", task_ids: Sequence[str | None],
                   references: Sequence[str | None], meta: dict | None = None) -> list[dict | None]:
        """What the store records of each answered task: TrajectoryStore.log_group's arguments but the config
        hash and the source (the guard's decision and the task's reference answer go into `meta`); None for a
        task answered without scoring (k = 1), which is not logged."""
        out: list[dict | None] = []
        for q, g, p, s, d, tid, ref in zip(questions, answered.groups, answered.passages, answered.scored,
                                           answered.decisions, task_ids, references):
            if s is None:
                out.append(None)
                continue
            marked = ({**(meta or {}), "guard": {**d.to_meta(), "served": s.ranking[0]}}
                      if d is not None and d.request.harmful else meta)
            if ref:
                marked = {**(marked or {}), "reference": ref}
            out.append({"group": g, "prompt": q, "passage_ids": [x.id for x in p], "task_id": tid, "meta": marked})
        return out

    def _answer(self, split: list[tuple[str, list[dict]]], references: Sequence[str | None] | None = None,
                continuing: Sequence["Continued | None"] | None = None, **sampling: Any) -> "Answered":
        params = {**self._sampling_params(), **sampling}
        k = params.pop("k")
        if k > 1 and self.scorer is None:
            raise AgentError(f"k = {k} needs a scorer to pick the best answer: build the agent with one, or use k=1")
        passages = self.retrieve([q for q, _ in split])
        chats = [self.messages(q, h, p) for (q, h), p in zip(split, passages)]
        continuing = list(continuing) if continuing is not None else [None] * len(split)
        fresh = [i for i, c in enumerate(continuing) if c is None]
        prompts: list = [None] * len(split)
        try:
            for i, ids in zip(fresh, self.encode_prompts([chats[i] for i in fresh], params["max_new_tokens"],
                                                         params.get("tools"))):
                prompts[i] = ids
        except ContextLengthError as e:
            e.index = fresh[e.index]
            raise
        for i, c in enumerate(continuing):
            if c is not None:
                prompts[i] = c.prompt_ids(self.policy, params["max_new_tokens"], self.engine.context_length, i)
        groups = self.engine.sample(chats, k=k, prompt_ids=prompts, **params)
        references = list(references) if references is not None else [None] * len(split)
        contexts = [ScoreContext(q, p, ref) for (q, _), p, ref in zip(split, passages, references)]
        scored: list[GroupScores | None] = [None] * len(groups)
        decisions: list[GuardDecision | None] = [None] * len(groups)
        if k > 1:
            if self.guard is not None:  # judged on the texts alone, so the batch is scored once, safe completions in
                decisions = self.guard.decide([q for q, _ in split], [[c.text for c in g.completions] for g in groups],
                                              passages)
                for g, d in zip(groups, decisions):
                    if d.safe_completion is not None:  # one more candidate, the one served
                        g.completions.append(self.policy.completion(g.prompt_token_ids, d.safe_completion,
                                                                    g.temperature))
            scored = self.scorer.score_groups(groups, contexts)
            for s, d in zip(scored, decisions):
                if d is not None:
                    s.ranking = d.serving_order(s.ranking)
        for g, c in zip(groups, continuing):
            if c is not None:
                c.extend(g)
        return Answered(groups, passages, contexts, scored, decisions)

    # ----- multi-turn episodes ------------------------------------------------------------------------
    def episode_runner(self, **sampling: Any):
        """The runner of this agent's episodes (episodes.py): its policy with the search tool over its fact index,
        as [episodes] and the sampling settings (overridden by `sampling`) say."""
        from .episodes import EpisodeRunner, SearchTool

        if self.retriever is None:
            raise AgentError("episodes search the fact index: give the agent one (retrieval.index)")
        if self.engine is not self.policy:
            raise AgentError("episodes sample in-process (each turn depends on the last tool result); leave "
                             "sampling.engine empty for loop.unit = \"episode\"")
        e = self.episodes
        params = {**self._sampling_params(), **sampling}
        return EpisodeRunner(self.policy, SearchTool(self.retriever, e.search_top_k), max_turns=e.max_turns,
                             max_new_tokens=params["max_new_tokens"], query_tokens=e.query_tokens,
                             temperature=params["temperature"], top_p=params["top_p"])

    def episode_groups(self, tasks: Sequence[Task], references: Sequence[str | None] | None = None,
                       seed: int | None = None, explore: int = 0, **sampling: Any) -> "Answered":
        """K episodes per task (the policy searching the fact index, then answering), scored on their final answers
        with the facts each retrieved: what scored_groups gives for single answers, a group's completions being
        its episodes and its passages every fact its episodes retrieved. `explore` episodes of each group are
        made to search first (collecting for training: [episodes] explore)."""
        if self.scorer is None or self.k < 2:
            raise AgentError("episode groups need a scorer and k >= 2")
        questions = [split_task(t)[0] for t in tasks]
        references = list(references) if references is not None else [None] * len(questions)
        with self._lock:
            self._check_promoted()
            runner = self.episode_runner(**sampling)
            groups, retrieved = runner.run(questions, sampling.get("k", self.k), seed=seed, explore=explore)
        penalty = self.episodes.tool_error_penalty
        contexts = [ScoreContext(q, [], ref) for q, ref in zip(questions, references)]
        scored = [self.scorer.score_episodes(g, c, r, penalty) for g, c, r in zip(groups, contexts, retrieved)]
        self.scorer.assign_rewards(groups, [s.composite for s in scored])
        passages = [list({p.id: p for ps in r for p in ps}.values()) for r in retrieved]
        return Answered(groups, passages, contexts, scored, [None] * len(groups))

    def sample_groups(self, tasks: Sequence[Task], **sampling: Any) -> tuple[list[Group], list[ScoreContext]]:
        """Retrieve and sample (no scoring, no logging): the raw groups and their scoring contexts."""
        split = [split_task(t) for t in tasks]
        params = {**self._sampling_params(), **sampling}
        with self._lock:
            passages = self.retrieve([q for q, _ in split])
            chats = [self.messages(q, h, p) for (q, h), p in zip(split, passages)]
            prompts = self.encode_prompts(chats, params["max_new_tokens"], params.get("tools"))
            groups = self.engine.sample(chats, prompt_ids=prompts, **params)
        return groups, [ScoreContext(q, p) for (q, _), p in zip(split, passages)]

    def check_fits(self, tasks: Sequence[Task], batch: int = 64, **sampling: Any) -> None:
        """Raise ContextLengthError (its index into `tasks`) for the first task whose prompt, with its facts
        retrieved, plus max_new_tokens is past the model's context; nothing is sampled."""
        max_new_tokens = {**self._sampling_params(), **sampling}["max_new_tokens"]
        for start in range(0, len(tasks), batch):
            split = [split_task(t) for t in tasks[start : start + batch]]
            passages = self.retrieve([q for q, _ in split])
            chats = [self.messages(q, h, p, lessons=False) for (q, h), p in zip(split, passages)]
            try:
                self.encode_prompts(chats, max_new_tokens)
            except ContextLengthError as e:
                e.index += start
                raise

    def encode_prompts(self, chats: Sequence[Sequence[dict]], max_new_tokens: int,
                       tools: Sequence[dict] | None = None) -> list[list[int]]:
        """Each chat's prompt token ids; ContextLengthError for the first whose prompt plus max_new_tokens is
        past the context window of what samples them (checked before any model call; a remote engine's can be
        below the model's own)."""
        prompts = [self.policy.encode_chat(chat, tools) for chat in chats]
        limit = self.engine.context_length
        for i, ids in enumerate(prompts):
            if limit is not None and len(ids) + max_new_tokens > limit:
                raise ContextLengthError(
                    f"task {i}: its prompt is {len(ids)} tokens (with the system prompt and retrieved facts) and "
                    f"max_new_tokens is {max_new_tokens}, {len(ids) + max_new_tokens} tokens in all, past the model's "
                    f"context of {limit}: shorten the chat, or lower max_tokens / sampling.max_new_tokens",
                    index=i, prompt_tokens=len(ids), limit=limit)
        return prompts

    def retrieve(self, questions: Sequence[str]) -> list[list[Passage]]:
        """The top_k facts for each question (none without a retriever)."""
        if self.retriever is None or self.top_k == 0:
            return [[] for _ in questions]
        if hasattr(self.retriever, "search_batch"):
            hits = self.retriever.search_batch(list(questions), k=self.top_k)
        else:
            hits = [self.retriever.search(q, k=self.top_k) for q in questions]
        return [[h.passage for h in hs] for hs in hits]

    def messages(self, question: str, history: Sequence[dict], passages: Sequence[Passage],
                 lessons: bool = True) -> list[dict]:
        """The chat sent to the policy: system prompt (the agent's, then the task's own system turns), earlier
        turns, then the facts, lessons (unless `lessons` is False: finding them is an embedding search) and
        the question."""
        found = self.experience.relevant(question) if lessons and self.experience is not None else []
        system = "\n\n".join([self.system] + [m["content"] for m in history if m.get("role") == "system"])
        chat = answer_messages(question, passages, found, system=system)
        turns = as_shown([m for m in history if m.get("role") != "system"])
        return chat[:1] + turns + chat[1:]

    def _sampling_params(self) -> dict[str, Any]:
        s = self.sampling
        return {"k": self.k, "max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                "seed": s.seed}

    # ----- following the loop's promotions ------------------------------------------------------------
    def follow(self, run_dir: str | os.PathLike) -> None:
        """Load the adapter (or, training-free, the lesson library) the loop in `run_dir` promotes, now and
        whenever it promotes a new one."""
        run = RunDir(run_dir)
        if not run.is_run():
            raise AgentError(f"{run.path} is not a loop's run directory (no promoted.json or state.json): give the "
                             "--run directory of `grpo-agent loop` or `grpo-agent update`")
        self._followed = run
        with self._lock:
            self._check_promoted()

    def _check_promoted(self) -> None:
        if self._followed is None:
            return
        try:
            promoted = self._followed.read_promoted()
        except LoopError as e:
            raise AgentError(str(e)) from e
        if promoted is None or promoted.version == self._followed_version:
            return
        target = self._followed.promoted_target(promoted)
        if promoted.kind == "adapter":
            self.policy.load_adapter(target, version=promoted.version)
            if self.engine is not self.policy:
                self.engine.load_adapter(target, version=promoted.version)
        elif self.experience is not None:  # a training-free run promotes a lesson library
            self.experience.load(target)
            self.policy.version = self.engine.version = promoted.version
        else:
            raise AgentError(f"{self._followed.path} is a training-free run: give the agent an ExperienceLibrary to "
                             "follow it")
        self._followed_version = promoted.version
