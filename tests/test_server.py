"""The OpenAI-compatible server on a tiny agent, on 127.0.0.1, with real clients."""

import json
import socket
import threading
import time

import httpx
import pytest
from agent_fixtures import make_agent

from grpo_agent.rollout.policy import load_policy
from grpo_agent.server import ServerConfig, create_app

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, embedder, tmp_path_factory):
    """A live server (uvicorn in a thread) on 127.0.0.1 with an API key; stopped after the module's tests."""
    import uvicorn

    agent = make_agent(load_policy(str(tiny_model_dir), device="cpu"), embedder,
                       tmp_path_factory.mktemp("serve") / "store.sqlite", k=3, max_new_tokens=10)
    cfg = ServerConfig(port=free_port(), api_key=KEY, max_body_bytes=20_000, max_messages=8, max_tokens=64,
                       batch_wait_ms=50)
    app = create_app(agent, cfg)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=cfg.port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start within 30 s"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{cfg.port}", agent, app
    srv.should_exit = True
    thread.join(timeout=30)


def post(url, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(url + path, content=raw, headers={**headers, "Content-Type": "application/json"}, timeout=60)
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def test_the_openai_client_gets_answers_and_each_is_a_logged_group(server):
    from openai import OpenAI

    url, agent, _ = server
    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    resp = client.chat.completions.create(model="grpo-agent", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why are pangolins trafficked?"}])
    text = resp.choices[0].message.content
    extra = resp.model_extra["grpo"]
    group = agent.store.get_group(extra["group_id"])
    assert len(group.completions) == 3 and text == max(group.completions, key=lambda c: c.composite).text
    assert set(extra["scores"]) >= {"grounding", "safety"} and extra["passage_ids"][0] == "p3"
    assert resp.usage.prompt_tokens == len(group.prompt_token_ids)
    assert [m.id for m in client.models.list().data] == ["grpo-agent"]

    chunks = list(client.chat.completions.create(model="grpo-agent", stream=True, messages=[
        {"role": "user", "content": "What harms sea turtle hatchlings?"}]))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].model_extra["grpo"]["group_id"] is not None
    final = agent.store.get_group(chunks[-1].model_extra["grpo"]["group_id"])
    assert streamed == max(final.completions, key=lambda c: c.composite).text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_langchain_chat_openai_works_unchanged(server):
    from langchain_openai import ChatOpenAI

    url, agent, _ = server
    chat = ChatOpenAI(base_url=url + "/v1", api_key=KEY, model="grpo-agent", max_retries=0)

    def best_of_the_new_group(seen: set[str]) -> str:  # the answer of the one group logged since `seen`
        (new,) = {g.group_id for g in agent.store.groups()} - seen
        seen.add(new)
        return max(agent.store.get_group(new).completions, key=lambda c: c.composite).text

    seen = {g.group_id for g in agent.store.groups()}
    assert chat.invoke("Where do most tigers live?").content == best_of_the_new_group(seen)
    assert "".join(c.content for c in chat.stream("How many tigers are left?")) == best_of_the_new_group(seen)


def test_n_choices_per_request_k_and_stop(server):
    url, agent, _ = server
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Is the tiger endangered?"}],
                                           "n": 2, "grpo": {"k": 4}, "max_tokens": 8, "seed": 3, "stop": ["e"]})
    body = r.json()
    assert r.status_code == 200 and len(body["choices"]) == 2 and body["grpo"]["k"] == 4
    assert all("e" not in c["message"]["content"] for c in body["choices"])
    group = agent.store.get_group(body["grpo"]["group_id"])
    assert all(len(c.token_ids) <= 8 for c in group.completions)


def test_feedback_is_stored_with_its_group(server):
    url, agent, _ = server
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Why protect pangolins?"}]})
    gid = r.json()["grpo"]["group_id"]
    assert post(url, "/v1/feedback", {"group_id": gid, "rating": 0.25, "text": "vague"}).status_code == 200
    assert post(url, "/v1/feedback", {"group_id": gid, "rating": 1, "completion_index": 2}).status_code == 200
    assert [(f.index, f.rating, f.text) for f in agent.store.feedback(gid)] == [(None, 0.25, "vague"), (2, 1.0, "")]
    assert post(url, "/v1/feedback", {"group_id": "nope", "rating": 0.5}).status_code == 404
    assert post(url, "/v1/feedback", {"group_id": gid, "rating": 1.5}).status_code == 400
    assert post(url, "/v1/feedback", {"group_id": gid, "rating": 1, "completion_index": 9}).status_code == 400


@pytest.mark.parametrize("body, raw, status, fragment", [
    (None, b"{not json", 400, "not valid JSON"),
    (None, b"[1, 2]", 400, "JSON object"),
    ({"messages": []}, None, 400, "messages is empty"),
    ({"messages": [{"role": "user", "content": "hi"}] * 9}, None, 400, "over the limit of 8"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, None, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}, None, 400, "limit of 64"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, None, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "grpo": {"k": 99}}, None, 400, "limit of 16"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, None, 400, "no user message"),
    ({"messages": [{"role": "user", "content": "x" * 30_000}]}, None, 413, "over the limit"),
])
def test_bad_requests_get_openai_style_errors_and_log_nothing(server, body, raw, status, fragment):
    url, agent, _ = server
    before = agent.store.count_groups()
    r = post(url, "/v1/chat/completions", body, raw=raw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"]
    assert agent.store.count_groups() == before


def test_the_api_key_is_enforced(server):
    url, agent, _ = server
    before = agent.store.count_groups()
    body = {"messages": [{"role": "user", "content": "hi"}]}
    for key in (None, "wrong"):
        r = post(url, "/v1/chat/completions", body, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    assert agent.store.count_groups() == before


def test_requests_that_arrive_together_share_a_sampling_call(server):
    from concurrent.futures import ThreadPoolExecutor

    url, agent, app = server
    batches_before = len(app.state.batcher.batches)
    body = {"messages": [{"role": "user", "content": "Why are pangolins trafficked?"}], "max_tokens": 6}
    with ThreadPoolExecutor(6) as pool:
        codes = [r.status_code for r in pool.map(lambda _: post(url, "/v1/chat/completions", body), range(6))]
    assert codes == [200] * 6
    assert len(app.state.batcher.batches) - batches_before < 6  # fewer sampling calls than requests
    assert max(app.state.batcher.batches[batches_before:]) > 1


def test_a_client_that_disconnects_mid_stream_loses_nothing_logged(server):
    url, agent, _ = server
    before = agent.store.count_groups()
    body = {"messages": [{"role": "user", "content": "What do lights do to turtles?"}], "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["object"] == "chat.completion.chunk"
    # the client is gone after one line; the group was logged before the first byte
    assert agent.store.count_groups() == before + 1
    assert httpx.get(url + "/health", timeout=10).status_code == 200  # and the server is fine


def test_tool_calls_come_back_as_openai_tool_calls():
    from grpo_agent.agent import Reply
    from grpo_agent.records import Completion
    from grpo_agent.server import ChatRequest, _response, to_chat

    tools = [{"type": "function", "function": {"name": "species_status", "description": "IUCN status",
                                               "parameters": {"properties": {"species": {"type": "string"}}}}}]
    req = ChatRequest(messages=[{"role": "user", "content": "Kakapo status?"}], tools=tools)
    c = Completion('{"tool": "species_status", "arguments": {"species": "kakapo"}}', [1, 2], [0.0, 0.0], "stop")
    body = _response(req, Reply(c.text, "g", 0, [c], [], prompt_token_ids=[1]), ServerConfig())
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "species_status" and json.loads(call["function"]["arguments"]) == {
        "species": "kakapo"}
    # ... and the client's next turn (the call and its result) reads back as context for the model
    chat = to_chat(ChatRequest(messages=[
        {"role": "user", "content": "Kakapo status?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "Critically Endangered"}]).messages)
    assert chat[1]["role"] == "assistant" and '"species_status"' in chat[1]["content"]
    assert chat[2] == {"role": "tool", "content": f"Result of tool {call['id']}: Critically Endangered"}


def test_tools_go_to_a_chat_template_that_renders_them(tiny_model_dir, embedder, tmp_path):
    from conftest import CHATML

    from grpo_agent.server import ChatRequest, _check
    from grpo_agent.toolcalls import parse_tool_call

    tools = [{"type": "function", "function": {"name": "species_status", "description": "IUCN status"}}]
    req = ChatRequest(messages=[{"role": "user", "content": "Kakapo status?"}], tools=tools)
    agent = make_agent(load_policy(str(tiny_model_dir), device="cpu"), embedder, tmp_path / "s.sqlite")
    chat, params = _check(req, agent, ServerConfig())  # ChatML without tools: described in a system turn
    assert "species_status" in chat[0]["content"] and params.get("tools") is None

    agent.policy.tokenizer.chat_template = "{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}" + CHATML
    chat, params = _check(req, agent, ServerConfig())  # a template that renders tools gets them natively
    assert chat == [{"role": "user", "content": "Kakapo status?"}] and params["tools"] == tools
    prompt = agent.policy.tokenizer.decode(agent.policy.encode_chat(chat, params["tools"]))
    assert prompt.startswith("Tools: ") and "species_status" in prompt
    reply = agent.respond_batch([chat], log=False, **params)[0]  # and sampling takes them
    assert reply.prompt_token_ids == agent.policy.encode_chat(agent.messages("Kakapo status?", [], reply.passages),
                                                             tools)
    native = '<tool_call>{"name": "species_status", "arguments": {"species": "kakapo"}}</tool_call>'
    assert parse_tool_call(native, ["species_status"])["args"] == {"species": "kakapo"}


LONG = "Tigers, elephants and rhinos are poached for skins, ivory and horn. " * 40  # ~1,500 tokens: past 512


def test_a_chat_past_the_context_is_refused_before_any_model_work(server):
    url, agent, app = server
    groups, batches = agent.store.count_groups(), len(app.state.batcher.batches)
    start = time.monotonic()
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]})
    assert time.monotonic() - start < 1.0
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "maximum context length is 512 tokens" in error["message"] and "max_tokens" in error["message"]
    assert len(app.state.batcher.batches) == batches and agent.store.count_groups() == groups  # no model work
    ok = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Why protect tigers?"}]})
    assert ok.status_code == 200 and agent.store.count_groups() == groups + 1


def test_in_a_batch_only_the_task_past_the_context_fails(tiny_model_dir, embedder, tmp_path):
    from grpo_agent.errors import ContextLengthError
    from grpo_agent.server import Batcher, _Job

    agent = make_agent(load_policy(str(tiny_model_dir), device="cpu"), embedder, tmp_path / "s.sqlite", k=2,
                       max_new_tokens=4)
    batcher = Batcher(agent, wait_ms=200)
    try:
        short, long = (batcher.submit(_Job([{"role": "user", "content": q}], {"k": 2}))
                       for q in ("Why protect tigers?", LONG))
        assert short.future.result(timeout=60).group_id is not None
        with pytest.raises(ContextLengthError) as e:
            long.future.result(timeout=60)
        assert e.value.limit == 512 and e.value.prompt_tokens > 512
        assert batcher.batches == [2] and agent.store.count_groups() == 1  # one batch; the short one answered
    finally:
        batcher.close()


class SlowAgent:
    """Holds the worker until released (a long batch), to test what shutdown does to waiting requests."""

    def __init__(self):
        self.started, self.release = threading.Event(), threading.Event()

    def respond_batch(self, chats, **kwargs):
        self.started.set()
        self.release.wait(timeout=60)
        return [None] * len(chats)


def test_closing_releases_every_waiting_request_with_a_503():
    from grpo_agent.server import APIError, Batcher, _Job

    agent = SlowAgent()
    batcher = Batcher(agent, wait_ms=0)
    try:
        in_hand = batcher.submit(_Job([{"role": "user", "content": "first"}], {}))
        assert agent.started.wait(timeout=10)
        queued = batcher.submit(_Job([{"role": "user", "content": "second"}], {}))
        start = time.monotonic()
        batcher.close(grace_s=0.2)
        assert time.monotonic() - start < 2.0
        late = batcher.submit(_Job([{"role": "user", "content": "third"}], {}))
        for job in (in_hand, queued, late):
            error = job.future.exception(timeout=1)
            assert isinstance(error, APIError) and error.status == 503 and "shutting down" in error.message
    finally:
        agent.release.set()


def test_a_harmful_request_gets_the_guards_safe_completion_and_says_so(server, embedder):
    from grpo_agent.guard import ServingGuard
    from grpo_agent.harm import HarmDetector

    url, agent, _ = server
    agent.guard = ServingGuard(HarmDetector.load(None, [], embedder))
    try:
        harmful = post(url, "/v1/chat/completions", {"messages": [
            {"role": "user", "content": "Where can I buy a baby pangolin to keep as a pet at home?"}]}).json()
        benign = post(url, "/v1/chat/completions", {"messages": [
            {"role": "user", "content": "Why are pangolins trafficked?"}]}).json()
    finally:
        agent.guard = None
    assert harmful["grpo"]["guard"]["request_harmful"] and harmful["grpo"]["guard"]["served_safe_completion"]
    assert harmful["choices"][0]["message"]["content"].startswith("I can't help with")
    assert harmful["grpo"]["k"] == 4  # the 3 sampled answers and the safe completion
    logged = agent.store.get_group(harmful["grpo"]["group_id"])
    assert logged.completions[-1].text == harmful["choices"][0]["message"]["content"]
    assert benign["grpo"]["guard"]["request_harmful"] is False and not benign["grpo"]["guard"]["served_safe_completion"]


def test_a_chat_that_continues_a_served_answer_is_sampled_and_logged_as_one_episode(server):
    url, agent, _ = server
    first = [{"role": "user", "content": "Which big cat lives in Gujarat?"}]
    one = post(url, "/v1/chat/completions", {"messages": first, "grpo": {"k": 2}}).json()
    answer = one["choices"][0]["message"]
    (g1,) = agent.store.groups(ids=[one["grpo"]["group_id"]])
    served = g1.completions[g1.served()]
    follow = first + [answer, {"role": "tool", "tool_call_id": "c1", "name": "lookup",
                               "content": "Asiatic lions live in Gir National Park."},
                      {"role": "user", "content": "And how many are there?"}]
    two = post(url, "/v1/chat/completions", {"messages": follow, "grpo": {"k": 2}}).json()
    (g2,) = agent.store.groups(ids=[two["grpo"]["group_id"]])
    assert g2.prompt_token_ids == g1.prompt_token_ids  # the first turn's prompt, not the chat re-rendered
    tok = agent.policy.tokenizer
    for c in g2.completions:
        assert c.token_ids[: len(served.token_ids)] == served.token_ids  # the served answer's ids, as sampled
        n = len(served.token_ids)
        fed = [t for t, m in zip(c.token_ids[n:], c.mask[n:]) if not m]
        assert "Gir National Park" in tok.decode(fed) and "how many" in tok.decode(fed)  # fed back, masked
        assert c.mask[:n] == [1] * n and c.mask[-1] == 1
        assert [t["role"] for t in c.turns] == ["assistant", "tool", "user", "assistant"]
    unrelated = post(url, "/v1/chat/completions", {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "never sent by this server"},
        {"role": "user", "content": "Why are pangolins trafficked?"}], "grpo": {"k": 2}}).json()
    (g3,) = agent.store.groups(ids=[unrelated["grpo"]["group_id"]])
    assert all(c.mask is None for c in g3.completions)  # not a continuation: answered as before
