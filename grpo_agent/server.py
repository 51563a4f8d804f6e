"""An OpenAI-compatible HTTP server for the agent: any framework that speaks the chat completions API uses
the self-improving agent unchanged, and every request it answers is a logged group the loop learns from.

    POST /v1/chat/completions   OpenAI request and response (and SSE chunks with "stream": true); the
                                response's extra "grpo" field holds the group id and the answer's scores
    GET  /v1/models             the one model served
    GET  /health                liveness, and the policy version being served
    POST /v1/feedback           {"group_id", "rating" in [0, 1], "completion_index"?, "text"?}

Requests that arrive together are answered in one batched sampling call: a single worker thread takes
every request queued while they keep arriving less than `batch_wait_ms` apart (at most 4 x batch_wait_ms,
and `max_batch` requests), groups those with the same sampling
settings, runs the agent on each set and logs the groups; it alone touches the model and writes the store.
A promoted adapter (`--run`) is picked up between two batches. A stream is produced from the finished
answer (best of K needs all K), so the group is logged before the first byte: a client that disconnects
loses nothing already logged.

A request whose chat (with the agent's system prompt) plus its max_tokens is past the model's context is
refused with OpenAI's 400 `context_length_exceeded` before it is queued (tokenised off the model worker);
one that the retrieved facts push over fails alone, and the rest of its batch is answered. On SIGTERM or
Ctrl-C, queued requests get a 503 at once, the batch in hand has `shutdown_grace_s` to finish (then its
requests get a 503 too) and the process exits; each group is logged in one SQLite transaction, so a batch
cut short leaves no partial group in the store.

A multi-turn chat is one episode (episodes.py's layout): the server remembers, for the last
`remembered_answers` answers it sent, the token ids that produced them; a request whose chat continues one
(the same turns up to that answer, then tool results or a user's reply) is sampled from those token ids and
the new turns, never from the earlier answers re-tokenised, and its group's completions are whole episodes.

One module of about 460 lines: the request schema, the batching worker and the routes share the limits
and error shapes of ServerConfig and APIError, and read best together.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import queue
import secrets
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .agent import Continued, GRPOAgent, split_task
from .episodes import tokens_covering
from .errors import ContextLengthError, EngineError, GRPOAgentError, UnknownGroupError
from .toolcalls import cut_at_stop, parse_tool_call, tool_calls_turn, tool_result_turn, tool_system_turn


@dataclass
class ServerConfig:
    """How the server listens and what it accepts."""

    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8000
    api_key: str | None = None  # when set, requests need "Authorization: Bearer <key>"
    model_name: str = "grpo-agent"  # the id /v1/models lists and responses carry
    max_body_bytes: int = 1_000_000
    max_messages: int = 64
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    max_k: int = 16  # the largest group a request may ask for in "grpo": {"k": ...}
    batch_wait_ms: float = 50.0  # how long the worker waits for more requests before sampling a batch
    max_batch: int = 16  # requests answered by one sampling call
    stream_chunk_chars: int = 16  # characters per streamed delta
    shutdown_grace_s: float = 3.0  # on SIGTERM: how long the batch in hand may run before its requests get 503
    remembered_answers: int = 4096  # answers whose token ids are kept, so a chat continuing one is one episode


# ----- request schema ---------------------------------------------------------------------------------------
class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI clients send many


class Message(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class GRPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(default=None, ge=1)  # answers sampled for this request (default: the config's)


class ChatRequest(_Loose):
    model: str | None = None
    messages: list[Message]
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    tools: list[dict] | None = None
    tool_choice: Any = None
    grpo: GRPOOptions | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    group_id: str = Field(min_length=1)
    rating: float = Field(ge=0.0, le=1.0)
    completion_index: int | None = Field(default=None, ge=0)
    text: str = ""


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _text(content: str | list[dict] | None) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def to_chat(messages: list[Message]) -> list[dict]:
    """OpenAI messages as the agent's chat (tool calls and results as text the model can read)."""
    chat = []
    for m in messages:
        if m.role == "tool":
            chat.append(tool_result_turn(m.name or m.tool_call_id, _text(m.content)))
        elif m.role == "assistant" and m.tool_calls:
            functions = [c.get("function", {}) for c in m.tool_calls]
            chat.append(tool_calls_turn([(f.get("name"), json.loads(f.get("arguments") or "{}")) for f in functions]))
        else:
            chat.append({"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)})
    return chat


# ----- the batching worker ----------------------------------------------------------------------------------
class Episodes:
    """The token ids behind the answers sent lately, keyed by the chat up to and including each answer (as a client
    sends it back): what a continuing chat is sampled from (bounded: the oldest are forgotten first)."""

    def __init__(self, size: int):
        self.size, self._items, self._lock = size, collections.OrderedDict(), threading.Lock()

    @staticmethod
    def key(chat: list[dict]) -> str:
        return hashlib.sha1(json.dumps(chat, sort_keys=True).encode()).hexdigest()

    def remember(self, chat: list[dict], record: dict) -> None:
        key = self.key(chat)
        with self._lock:
            self._items[key] = record
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def continued(self, chat: list[dict]) -> Continued | None:
        """The episode `chat` continues (its last answer is one this server sent, new turns after it), or None."""
        last = max((i for i, m in enumerate(chat) if m["role"] == "assistant"), default=None)
        if last is None or last == len(chat) - 1:
            return None
        with self._lock:
            record = self._items.get(self.key(chat[: last + 1]))
        if record is None:
            return None
        return Continued(record["prompt"], record["tokens"], record["logprobs"], record["mask"], record["turns"],
                         before=chat[:last], new=chat[last + 1 :])


@dataclass
class _Job:
    chat: list[dict]
    params: dict  # sampling overrides: k, temperature, top_p, max_new_tokens, seed
    continued: Continued | None = None  # the episode the chat continues
    future: Future = field(default_factory=Future)  # the Reply, or the error the request is answered with

    def finish(self, reply: Any = None, error: BaseException | None = None) -> None:
        """Hand the waiting request its reply or error, unless it already has one."""
        with contextlib.suppress(InvalidStateError):  # released at shutdown, or the request gave up
            if error is None:
                self.future.set_result(reply)
            else:
                self.future.set_exception(error)


def _shutting_down() -> APIError:
    """The error a request still waiting for the model gets when the server stops."""
    return APIError(503, "the server is shutting down: retry the request when it is back", code="server_shutting_down",
                    kind="server_error")


class Batcher:
    """One worker thread answers every request, batching those that arrive within `wait_ms` of each other."""

    def __init__(self, agent: GRPOAgent, wait_ms: float = 50.0, max_batch: int = 16):
        self.agent, self.wait_s, self.max_batch = agent, wait_ms / 1000, max_batch
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches run, for tests and the benchmark
        self._closing = False
        self._lock = threading.Lock()  # orders submit() against close()
        self._in_hand: list[_Job] = []  # the batch the worker is answering
        self._thread = threading.Thread(target=self._run, name="grpo-agent-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> _Job:
        with self._lock:
            if self._closing:
                job.finish(error=_shutting_down())
            else:
                self.jobs.put(job)
        return job

    def close(self, grace_s: float = 3.0) -> None:
        """Stop: queued requests get a 503 now, the batch in hand has `grace_s` to finish, then its requests get
        a 503 too. The worker is a daemon thread: a batch still running when the process exits logs no partial
        group (each group is one SQLite transaction)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        while True:  # nothing is queued after the flag, so this empties the queue for good
            try:
                self.jobs.get_nowait().finish(error=_shutting_down())
            except queue.Empty:
                break
        self.jobs.put(None)
        self._thread.join(timeout=grace_s)
        for job in self._in_hand:
            job.finish(error=_shutting_down())

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch = [job]
            # Wait while requests keep coming (each arrival extends the wait by wait_s), for at most 4 x wait_s.
            start = time.monotonic()
            deadline = start + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                batch.append(nxt)
                deadline = min(start + 4 * self.wait_s, time.monotonic() + self.wait_s)
            self._in_hand = batch
            if self._closing:  # close() began while this batch gathered
                for j in batch:
                    j.finish(error=_shutting_down())
                continue
            self.batches.append(len(batch))
            by_params: dict[str, list[_Job]] = {}
            for j in batch:
                by_params.setdefault(json.dumps(j.params, sort_keys=True), []).append(j)
            for same in by_params.values():
                if self._closing:  # past the grace period close() answered these with 503
                    break
                self._answer(same)
            self._in_hand = []

    def _answer(self, jobs: list[_Job]) -> None:
        """Answer jobs with the same settings in one respond_batch call; one too long for the context fails alone."""
        while jobs:
            try:
                replies = self.agent.respond_batch([j.chat for j in jobs], source="server",
                                                   continuing=[j.continued for j in jobs], **jobs[0].params)
            except ContextLengthError as e:  # raised before any sampling: retry without that job
                jobs[e.index].finish(error=e)
                jobs = jobs[: e.index] + jobs[e.index + 1 :]
                continue
            except BaseException as e:  # noqa: BLE001 - handed to the waiting requests, never lost
                for j in jobs:
                    j.finish(error=e)
                return
            for j, r in zip(jobs, replies):
                j.finish(r)
            return


# ----- the app ----------------------------------------------------------------------------------------------
def create_app(agent: GRPOAgent, cfg: ServerConfig | None = None):
    """The FastAPI app serving `agent` (its store logs every group); see the module docstring."""
    cfg = cfg or ServerConfig()
    if agent.k > 1 and agent.store is None:
        raise GRPOAgentError("the server logs every group: give the agent a store")
    batcher = Batcher(agent, cfg.batch_wait_ms, cfg.max_batch)
    episodes = Episodes(cfg.remembered_answers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close(cfg.shutdown_grace_s)  # answer or release every waiting request, then stop

    app = FastAPI(title="grpo-agent", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher, app.state.episodes = batcher, episodes

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # never a bare 500 page
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body(),
                            status_code=500)

    def authorise(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), cfg.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", kind="authentication_error")

    async def read_json(request: Request, schema: type[BaseModel]):
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > cfg.max_body_bytes:
            raise APIError(413, f"request body of {size} bytes is over the limit of {cfg.max_body_bytes}")
        body = await request.body()
        if len(body) > cfg.max_body_bytes:
            raise APIError(413, f"request body of {len(body)} bytes is over the limit of {cfg.max_body_bytes}")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first["loc"])
            raise APIError(400, f"{param}: {first['msg']}", param=param) from e

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name, "policy_version": agent.policy.version,
                "batches": len(batcher.batches)}

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "grpo-agent"}]}

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        authorise(request)
        fb = await read_json(request, FeedbackRequest)
        try:
            fid = agent.store.add_feedback(fb.group_id, fb.rating, fb.completion_index, fb.text)
        except UnknownGroupError as e:
            raise APIError(404, str(e), param="group_id") from e
        except GRPOAgentError as e:
            raise APIError(400, str(e), param="group_id") from e
        return {"id": fid, "object": "feedback", "group_id": fb.group_id}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorise(request)
        req = await read_json(request, ChatRequest)
        chat, params = _check(req, agent, cfg)
        max_new_tokens = params.get("max_new_tokens", agent.sampling.max_new_tokens)
        continued = episodes.continued(chat)
        try:
            # Tokenised in a thread (not on the event loop, not on the model worker), before any model work.
            if continued is None:
                await asyncio.to_thread(_check_context, agent, chat, max_new_tokens, params.get("tools"))
            reply = await asyncio.wrap_future(batcher.submit(_Job(chat, params, continued)).future)
        except ContextLengthError as e:  # too long as sent, or once the facts were added
            raise _too_long(e, max_new_tokens) from e
        except EngineError as e:  # the inference server behind us failed: not the client's fault
            raise APIError(502, str(e)) from e
        except GRPOAgentError as e:
            raise APIError(400, str(e)) from e
        body = _response(req, reply, cfg)
        _remember(episodes, agent, chat, req, reply, body)
        if not req.stream:
            return body
        return StreamingResponse(_stream(body, cfg.stream_chunk_chars), media_type="text/event-stream")

    return app


def _check(req: ChatRequest, agent: GRPOAgent, cfg: ServerConfig) -> tuple[list[dict], dict]:
    """The agent's chat and sampling overrides for a valid request; APIError for one over the limits."""
    if not req.messages:
        raise APIError(400, "messages is empty: send at least one user message", param="messages")
    if len(req.messages) > cfg.max_messages:
        raise APIError(400, f"{len(req.messages)} messages is over the limit of {cfg.max_messages}", param="messages")
    if not any(m.role == "user" and _text(m.content).strip() for m in req.messages):
        raise APIError(400, "no user message with text: the last user message is the question", param="messages")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > cfg.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} is over the server's limit of {cfg.max_tokens}",
                       param="max_tokens")
    if req.tool_choice not in (None, "auto", "none"):
        raise APIError(400, "tool_choice can be 'auto' or 'none': a sampled answer may or may not call a tool",
                       param="tool_choice")
    k = max(req.grpo.k if req.grpo and req.grpo.k else agent.k, req.n)
    if k > cfg.max_k:
        raise APIError(400, f"a group of {k} answers is over the server's limit of {cfg.max_k}", param="grpo.k")
    if k > 1 and agent.scorer is None:
        raise APIError(400, "this server samples one answer per request; n and grpo.k must be 1", param="n")
    chat = to_chat(req.messages)
    tools = req.tools if req.tools and req.tool_choice != "none" else None
    native = tools and agent.policy.template_takes_tools
    if tools and not native:  # a template without tool support: describe them in a system turn
        chat = [tool_system_turn(tools)] + chat
    params = {"k": k, "temperature": req.temperature, "top_p": req.top_p, "max_new_tokens": max_tokens,
              "seed": req.seed, "tools": tools if native else None}
    return chat, {key: v for key, v in params.items() if v is not None}


def _check_context(agent: GRPOAgent, chat: list[dict], max_new_tokens: int, tools: list[dict] | None) -> None:
    """ContextLengthError when the chat as the agent prompts it, before facts and lessons are added (they only
    lengthen it), plus max_new_tokens is past the model's context."""
    question, history = split_task(chat)  # without lessons: finding them is model work, which stays on the worker
    agent.encode_prompts([agent.messages(question, history, [], lessons=False)], max_new_tokens, tools)


def _too_long(e: ContextLengthError, max_new_tokens: int) -> APIError:
    """OpenAI's context_length_exceeded error for a request past the model's context."""
    return APIError(400, f"this model's maximum context length is {e.limit} tokens, but the request needs "
                         f"{e.prompt_tokens + max_new_tokens}: {e.prompt_tokens} for the messages as the agent prompts "
                         f"the model, and {max_new_tokens} for the answer; shorten the messages or lower max_tokens",
                    param="messages", code="context_length_exceeded")


def _served_order(reply) -> list[int]:
    """The candidates in the order the choices list them: the served one, then by composite."""
    return sorted(range(len(reply.candidates)), key=lambda i: (i != reply.best, -(reply.candidates[i].composite or 0.0)))


def _response(req: ChatRequest, reply, cfg: ServerConfig) -> dict:
    """The chat.completion object: the n best answers, best first, with the group in "grpo"."""
    order = _served_order(reply)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    tools = [t["function"]["name"] for t in (req.tools or []) if "function" in t]
    choices = []
    for n, i in enumerate(order[: req.n]):
        c = reply.candidates[i]
        text, cut = cut_at_stop(c.text, stops)
        finish = "stop" if cut else c.finish_reason
        message: dict[str, Any] = {"role": "assistant", "content": text}
        call = parse_tool_call(text, tools) if tools and req.tool_choice != "none" else None
        if call:
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": call["id"], "type": "function",
                 "function": {"name": call["name"], "arguments": json.dumps(call["args"])}}]}
            finish = "tool_calls"
        choices.append({"index": n, "message": message, "finish_reason": finish, "logprobs": None})
    prompt_tokens = len(reply.prompt_token_ids)
    completion_tokens = sum(len(reply.candidates[i].token_ids) for i in order[: req.n])
    best = reply.candidates[reply.best]
    return {
        "id": f"chatcmpl-{reply.group_id or uuid.uuid4().hex}", "object": "chat.completion",
        "created": int(time.time()), "model": cfg.model_name, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "grpo": {"group_id": reply.group_id, "scores": best.scores, "composite": best.composite,
                 "policy_version": reply.policy_version, "k": len(reply.candidates),
                 "passage_ids": [p.id for p in reply.passages],
                 # the serving guard: was the request judged harmful, and is the answer its safe completion?
                 "guard": reply.guard.to_meta() if reply.guard is not None else None,
                 "alignment": (reply.explanations.get("alignment") or [None] * (reply.best + 1))[reply.best]},
    }


def _remember(episodes: Episodes, agent: GRPOAgent, chat: list[dict], req: ChatRequest, reply, body: dict) -> None:
    """Keep the token ids behind each answer sent, under the chat a client continuing from it sends back (an
    answer cut at a stop sequence keeps the tokens up to it only)."""
    order = _served_order(reply)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    for choice, i in zip(body["choices"], order):
        c = reply.candidates[i]
        mask = c.mask or [1] * len(c.token_ids)
        start = len(mask) - next((n for n, m in enumerate(reversed(mask)) if not m), len(mask))  # its last turn
        text, cut = cut_at_stop(c.text, stops)
        kept = start + len(tokens_covering(agent.policy.tokenizer, c.token_ids[start:], text)) if cut else len(mask)
        sent = to_chat([Message(**choice["message"])])[0]  # the answer as a client sends it back
        turns = (c.turns or [{"role": "assistant", "content": c.text}])[:-1] + [sent]
        episodes.remember(chat + [sent], {"prompt": list(reply.prompt_token_ids), "tokens": c.token_ids[:kept],
                                          "logprobs": c.logprobs[:kept], "mask": mask[:kept], "turns": turns})


def _stream(body: dict, size: int):
    """The response as OpenAI chat.completion.chunk server-sent events, then [DONE]."""
    base = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": body["model"]}

    def event(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n"

    for choice in body["choices"]:
        i, message = choice["index"], choice["message"]
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        if message.get("tool_calls"):
            calls = [{"index": n, **call} for n, call in enumerate(message["tool_calls"])]
            yield event([{"index": i, "delta": {"tool_calls": calls}, "finish_reason": None}])
        text = message.get("content") or ""
        for start in range(0, len(text), size):
            yield event([{"index": i, "delta": {"content": text[start : start + size]}, "finish_reason": None}])
        yield event([{"index": i, "delta": {}, "finish_reason": choice["finish_reason"]}])
    yield event([], usage=body["usage"], grpo=body["grpo"])
    yield "data: [DONE]\n\n"


def serve(agent: GRPOAgent, cfg: ServerConfig) -> None:
    """Run the server until SIGTERM or Ctrl-C, then stop within about cfg.shutdown_grace_s."""
    import uvicorn

    app = create_app(agent, cfg)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # Answer every waiting request first (its reply, or a 503 once the grace is spent), so uvicorn
            # finds no connection waiting on the model when it closes them.
            await asyncio.to_thread(app.state.batcher.close, cfg.shutdown_grace_s)
            await super().shutdown(sockets)

    Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                          timeout_graceful_shutdown=cfg.shutdown_grace_s)).run()
