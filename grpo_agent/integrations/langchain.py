"""LangChain adapters.

- `GRPOChatModel`: a chat model that answers with the agent (best of K self-scored samples, each group
  logged for the updater); works in LCEL chains, and with `bind_tools` in a tool-calling agent loop.
- `FactIndexRetriever`: the fact index as a `BaseRetriever`.
- `GRPORunRecorder`: a callback handler that records a LangChain run's steps (model calls, tool calls and
  their results) and attaches them in the store to the groups the run produced.
- `collect_episodes`: a tool-calling agent the user wrote (LangChain, or LangGraph's `create_react_agent`) run K
  times on a task with an `EpisodeChatModel`, which samples one answer per call and keeps the run's token ids as
  sampled; the K runs are one group of multi-turn episodes (episodes.py), scored on their final answers with
  what their tools returned, and logged for the updater.
"""

from __future__ import annotations

from typing import Any, Sequence
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult, LLMResult
from langchain_core.retrievers import BaseRetriever
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field

from ..episodes import Trace, fed_back, tokens_covering
from ..records import Completion, Group, Passage
from ..retrieval import FactIndex
from ..toolcalls import as_shown, cut_at_stop, parse_tool_call, tool_calls_turn, tool_result_turn, tool_system_turn

_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


def to_chat(messages: Sequence[BaseMessage]) -> list[dict]:
    """LangChain messages as the agent's chat; a tool result is a "tool" turn naming the tool (the agent
    shows it to the model as a user turn; the question stays the last human message)."""
    chat = []
    for m in messages:
        if isinstance(m, ToolMessage):
            chat.append(tool_result_turn(m.name or m.tool_call_id, m.text))
        elif isinstance(m, AIMessage) and m.tool_calls:
            chat.append(tool_calls_turn([(c["name"], c["args"]) for c in m.tool_calls]))
        elif m.type in _ROLES:
            chat.append({"role": _ROLES[m.type], "content": m.text})
        else:
            raise ValueError(f"GRPOChatModel cannot take a {m.type!r} message: use system, human, ai or tool")
    return chat


class GRPOChatModel(BaseChatModel):
    """A LangChain chat model backed by a `GRPOAgent`.

    Each call retrieves facts, samples K answers, scores them and returns the best; the message's
    `response_metadata` holds the logged group's id, the answer's scores and the policy version. With
    tools bound, the tools are described in the system prompt and a JSON tool call in the answer becomes
    the message's `tool_calls`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    agent: Any  # a grpo_agent.agent.GRPOAgent
    k: int | None = None  # answers sampled per call; None: the agent's own k

    @property
    def _llm_type(self) -> str:
        return "grpo-agent"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        chat = to_chat(messages)
        tools = kwargs.get("tools") or []
        if tools:
            chat = [tool_system_turn(tools)] + chat
        overrides = {"k": self.k} if self.k else {}
        reply = self.agent.respond(chat, **overrides)
        text, _ = cut_at_stop(reply.answer, stop or [])
        call = parse_tool_call(text, [t["function"]["name"] for t in tools]) if tools else None
        if call:
            call["type"] = "tool_call"
        info = {"group_id": reply.group_id, "scores": reply.scores, "composite": reply.composite,
                "policy_version": reply.policy_version, "passage_ids": [p.id for p in reply.passages]}
        message = AIMessage(content="" if call else text, tool_calls=[call] if call else [], response_metadata=info)
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any):
        """Bind tools (LangChain tools, functions or OpenAI tool schemas) for tool calling. The model chooses
        whether to call one: `tool_choice` other than "auto" (forcing a call) is not supported."""
        if tool_choice not in (None, "auto"):
            raise ValueError(f"GRPOChatModel cannot force tool_choice={tool_choice!r}: a sampled answer may or may "
                             "not call a tool; leave tool_choice unset (this also rules out with_structured_output)")
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)


class EpisodeChatModel(BaseChatModel):
    """One episode of a tool-calling agent run: each call samples one answer from the agent's policy (no best of
    K) and continues the token ids of the calls before it. Between two calls the conversation may only grow by
    the answer this model gave and the turns after it (the tools' results); those turns are rendered by the chat
    template and fed to the policy (masked in training), the policy's own turns never re-tokenised.
    `episode()` is the run so far as a Completion (collect_episodes makes one model per episode)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    agent: Any  # a grpo_agent.agent.GRPOAgent
    seed: int | None = None
    max_turns: int = 8  # model calls in one run, at most: the last one's answer is the final one, even if it names a tool
    start: list = Field(default_factory=list)  # the first call's conversation: the task
    chat: list = Field(default_factory=list)  # the conversation as the policy saw it (for the template)
    prompt: list = Field(default_factory=list)  # the first call's prompt ids
    trace: Trace = Field(default_factory=Trace)  # every token id after the first prompt, sampled or fed back
    turns: list = Field(default_factory=list)
    passages: list = Field(default_factory=list)  # what the tools returned, as passages for the scorers
    answer: str = ""
    finish_reason: str = "length"

    @property
    def _llm_type(self) -> str:
        return "grpo-agent-episode"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        policy = self.agent.policy
        tools = kwargs.get("tools") or []
        chat = as_shown(([tool_system_turn(tools)] if tools else []) + to_chat(messages))
        calls = sum(t["role"] == "assistant" for t in self.turns)
        if calls >= self.max_turns:
            raise ValueError(f"the agent called the model again after its final answer (max_turns = {self.max_turns}); "
                             "end the run when the model answers without a tool call")
        if not self.prompt:
            self.prompt, self.chat, self.start = policy.encode_chat(chat), chat, chat
        else:
            before = self.chat  # ends with the answer this model gave last
            if len(chat) <= len(before) or chat[: len(before)] != before:
                raise ValueError("the agent changed the conversation between two model calls; an episode's "
                                 "conversation may only grow by the model's answer and the turns after it")
            new = chat[len(before):]
            with self.agent._lock:  # (the tokenizer too is used by one thread at a time)
                ids = fed_back(policy.tokenizer, before[:-1], new, self.trace.tokens[-1], policy.stop_token_ids)
            self.trace.add(ids, None)
            for m, turn in zip(messages[len(messages) - len(new):], new):
                if isinstance(m, ToolMessage):
                    self.passages.append(Passage(f"{m.name}:{m.tool_call_id}", m.text, source=m.name or "tool"))
                    self.turns.append({"role": "tool", "name": m.name, "content": m.text,
                                       "error": getattr(m, "status", "success") == "error"})
                else:
                    self.turns.append(dict(turn))
        s = self.agent.sampling
        seed = None if self.seed is None else (self.seed * 1_000_003 + calls) % 2**31
        with self.agent._lock:  # one model call at a time, on the weights the agent follows
            if not calls:
                self.agent._check_promoted()
            (group,) = policy.sample([chat], k=1, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                     top_p=s.top_p, seed=seed, prompt_ids=[self.prompt + self.trace.tokens])
        c = group.completions[0]
        text, cut = cut_at_stop(c.text, stop or [])
        ids, logprobs = (tokens_covering(policy.tokenizer, c.token_ids, text), c.logprobs) if cut else (c.token_ids, c.logprobs)
        self.trace.add(ids, logprobs[: len(ids)])  # (a turn cut at a stop sequence keeps only the tokens up to it)
        final = calls == self.max_turns - 1  # the last allowed call: its answer ends the run
        call = parse_tool_call(text, [t["function"]["name"] for t in tools]) if tools and not final else None
        self.turns.append({"role": "assistant", "content": text, "action": "tool_call" if call else "answer"})
        answer = tool_calls_turn([(call["name"], call["args"])]) if call else {"role": "assistant", "content": text}
        self.chat = chat + [answer]  # (what to_chat makes of the AIMessage returned, next call)
        if call:
            call["type"] = "tool_call"
        else:
            self.answer, self.finish_reason = text, c.finish_reason
        message = AIMessage(content="" if call else text, tool_calls=[call] if call else [],
                            response_metadata={"policy_version": policy.version})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any):
        """As GRPOChatModel.bind_tools."""
        if tool_choice not in (None, "auto"):
            raise ValueError(f"EpisodeChatModel cannot force tool_choice={tool_choice!r}; leave it unset")
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def episode(self) -> Completion:
        """The run so far: every token id after the first prompt, 1 in `mask` where the policy sampled it."""
        if not self.prompt:
            raise ValueError("the agent never called the model: nothing to make an episode of")
        return self.trace.completion(self.answer, self.finish_reason, self.turns)


def collect_episodes(agent, question: str, run, k: int | None = None, seed: int | None = None,
                     source: str = "langchain") -> Group:
    """Run the user's agent `k` times (default the agent's k) on `question` and return the runs as one scored
    group of episodes, logged in the agent's store. `run(model, question)` builds the user's agent around `model`
    (an EpisodeChatModel: bind_tools works, as with create_react_agent) and runs it to its end."""
    from ..scoring import ScoreContext

    k = k or agent.k
    models = [EpisodeChatModel(agent=agent, seed=None if seed is None else (seed * 1_000_003 + i) % 2**31)
              for i in range(k)]
    for model in models:
        run(model, question)
    episodes = [m.episode() for m in models]
    prompts = {tuple(m.prompt) for m in models}
    if len(prompts) != 1:
        raise ValueError("the K runs started from different prompts: a group's episodes must answer the same task")
    group = Group(messages=[dict(m) for m in models[0].start], prompt_token_ids=list(models[0].prompt),
                  completions=episodes, policy_version=agent.policy.version, temperature=agent.sampling.temperature)
    scored = agent.scorer.score_episodes(group, ScoreContext(question), [m.passages for m in models],
                                         agent.episodes.tool_error_penalty)
    agent.scorer.assign_rewards([group], [scored.composite])
    if agent.store is not None:
        agent.store.log_group(group, prompt=question, passage_ids=[p.id for m in models for p in m.passages],
                              config_hash=agent.config_hash, source=source)
    return group


class GRPORunRecorder(BaseCallbackHandler):
    """Records a LangChain run's steps and attaches them to the groups it produced.

    Every chat-model call, tool call and tool result is kept in order in `steps`; when an outermost chain
    ends (or on `flush()`, for a loop driven by hand), the steps are attached (`TrajectoryStore.attach_steps`)
    to each group the run's GRPOChatModel calls logged, so the store keeps the whole agent trajectory next
    to the sampled answers.
    """

    raise_error = True  # a store that cannot take the steps is an error, not a silent loss

    def __init__(self, store=None):
        self.store = store
        self.steps: list[dict] = []
        self.group_ids: list[str] = []

    def _add(self, kind: str, run_id: UUID, parent_run_id: UUID | None, **data: Any) -> None:
        self.steps.append({"type": kind, "run_id": str(run_id),
                           "parent_run_id": str(parent_run_id) if parent_run_id else None, **data})

    def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None, **kwargs):
        flat = [m for batch in messages for m in batch]
        self._add("model_start", run_id, parent_run_id, messages=[{"type": m.type, "content": m.text}
                                                                   for m in flat])

    def on_llm_end(self, response: LLMResult, *, run_id, parent_run_id=None, **kwargs):
        for gens in response.generations:
            for gen in gens:
                info = gen.generation_info or {}
                message = getattr(gen, "message", None)
                calls = [{"name": c["name"], "args": c["args"]} for c in getattr(message, "tool_calls", [])]
                self._add("model_end", run_id, parent_run_id, text=gen.text, tool_calls=calls,
                          group_id=info.get("group_id"))
                if info.get("group_id"):
                    self.group_ids.append(info["group_id"])

    def on_tool_start(self, serialized, input_str, *, run_id, parent_run_id=None, **kwargs):
        self._add("tool_start", run_id, parent_run_id, name=(serialized or {}).get("name"), input=input_str)

    def on_tool_end(self, output, *, run_id, parent_run_id=None, **kwargs):
        self._add("tool_end", run_id, parent_run_id, output=str(getattr(output, "content", output)))

    def on_chain_end(self, outputs, *, run_id, parent_run_id=None, **kwargs):
        if parent_run_id is None:
            self.flush()

    def on_chain_error(self, error, *, run_id, parent_run_id=None, **kwargs):
        if parent_run_id is None:  # a failed run's steps must not leak into the next run's groups
            self.steps, self.group_ids = [], []

    def flush(self) -> None:
        """Attach the steps recorded so far to every group they produced, then start afresh."""
        if self.store is not None:
            for gid in dict.fromkeys(self.group_ids):
                self.store.attach_steps(gid, self.steps)
        self.steps, self.group_ids = [], []


class FactIndexRetriever(BaseRetriever):
    """Returns the k passages of a `FactIndex` most similar to the query as LangChain `Document`s.

    Each document's metadata holds the passage id, its source citation, the similarity score and the
    passage's own metadata.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: FactIndex
    k: int = Field(default=4, ge=1)
    min_score: float | None = None  # drop passages less similar than this (cosine)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        hits = self.index.search(query, kwargs.get("k", self.k))
        return [
            Document(
                page_content=hit.passage.text,
                id=hit.passage.id,
                metadata={**hit.passage.metadata, "id": hit.passage.id, "source": hit.passage.source,
                          "score": hit.score},
            )
            for hit in hits
            if self.min_score is None or hit.score >= self.min_score
        ]
