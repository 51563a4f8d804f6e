"""LangChain adapters.

- `GRPOChatModel`: a chat model that answers with the agent (best of K self-scored samples, each group
  logged for the updater); works in LCEL chains, and with `bind_tools` in a tool-calling agent loop.
- `FactIndexRetriever`: the fact index as a `BaseRetriever`.
- `GRPORunRecorder`: a callback handler that records a LangChain run's steps (model calls, tool calls and
  their results) and attaches them in the store to the groups the run produced.
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

from ..retrieval import FactIndex
from ..toolcalls import cut_at_stop, parse_tool_call, tool_calls_turn, tool_result_turn, tool_system_turn

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
