import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from agent_fixtures import make_agent
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool

from grpo_agent.agent import Reply
from grpo_agent.integrations.langchain import GRPOChatModel, GRPORunRecorder, to_chat
from grpo_agent.toolcalls import parse_tool_call
from grpo_agent.rollout.policy import load_policy
from grpo_agent.records import Completion

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def agent(tiny_model_dir, embedder, tmp_path):
    return make_agent(load_policy(str(tiny_model_dir), device="cpu"), embedder, tmp_path / "store.sqlite")


def test_the_chat_model_runs_in_an_lcel_chain_and_logs_its_group(agent):
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])
    recorder = GRPORunRecorder(agent.store)
    chain = prompt | GRPOChatModel(agent=agent) | StrOutputParser()
    answer = chain.invoke({"question": "Why are pangolins trafficked?"}, config={"callbacks": [recorder]})
    (group,) = agent.store.groups()
    best = max(group.completions, key=lambda c: c.composite)
    assert answer == best.text
    steps = agent.store.steps(group.group_id)  # attached when the chain ended
    assert [s["type"] for s in steps] == ["model_start", "model_end"]
    assert steps[1]["group_id"] == group.group_id and "Be brief." in steps[0]["messages"][0]["content"]


def test_response_metadata_names_the_group_and_scores(agent):
    message = GRPOChatModel(agent=agent).invoke([HumanMessage("What harms sea turtle hatchlings?")])
    meta = message.response_metadata
    assert agent.store.get_group(meta["group_id"]) is not None
    assert set(meta["scores"]) >= {"grounding", "safety"} and meta["passage_ids"][0] == "p2"


def test_tool_calls_are_parsed_only_for_bound_tools():
    text = 'Let me check. {"tool": "species_status", "arguments": {"species": "kakapo"}} done'
    call = parse_tool_call(text, ["species_status"])
    assert call["name"] == "species_status" and call["args"] == {"species": "kakapo"}
    assert parse_tool_call(text, ["other_tool"]) is None
    assert parse_tool_call("no json {here", ["species_status"]) is None


class ScriptedAgent:
    """Replies with fixed texts in turn (to drive the tool-calling protocol deterministically)."""

    def __init__(self, texts):
        self.texts, self.chats = list(texts), []

    def respond(self, chat, **kwargs):
        self.chats.append(chat)
        c = Completion(self.texts.pop(0), [1], [0.0], "stop")
        return Reply(c.text, None, 0, [c], [])


def test_a_tool_calling_agent_loop():
    @tool
    def species_status(species: str) -> str:
        """The IUCN Red List status of a species."""
        return {"kakapo": "Critically Endangered"}.get(species, "unknown")

    scripted = ScriptedAgent(['{"tool": "species_status", "arguments": {"species": "kakapo"}}',
                              "The kakapo is Critically Endangered."])
    model = GRPOChatModel(agent=scripted).bind_tools([species_status])
    messages = [SystemMessage("Use tools when useful."), HumanMessage("How threatened is the kakapo?")]
    first = model.invoke(messages)
    assert first.tool_calls[0]["name"] == "species_status" and first.content == ""
    messages += [first, ToolMessage(species_status.invoke(first.tool_calls[0]["args"]),
                                    tool_call_id=first.tool_calls[0]["id"], name="species_status")]
    final = model.invoke(messages)
    assert final.content == "The kakapo is Critically Endangered." and not final.tool_calls
    sent = scripted.chats[1]  # what the agent saw on the second call
    assert "species_status" in sent[0]["content"]  # the tools are described to the model
    assert sent[-1] == {"role": "tool", "content": "Result of tool species_status: Critically Endangered"}
    assert sent[-2]["role"] == "assistant" and '"species_status"' in sent[-2]["content"]


def test_to_chat_rejects_unknown_message_kinds():
    assert to_chat([AIMessage("hi")]) == [{"role": "assistant", "content": "hi"}]
    from langchain_core.messages import FunctionMessage

    with pytest.raises(ValueError, match="cannot take a 'function' message"):
        to_chat([FunctionMessage(content="x", name="f")])


def test_the_langchain_example_runs(tiny_model_dir, tmp_path):
    # The example's facts take ~700 tokens of the tiny 320-token vocabulary: give the tiny model a wider context.
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "langchain_chain.py"), "Why protect tigers?",
                          "--model", str(model), "--store", str(tmp_path / "store.sqlite")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "logged group" in out.stdout and "steps recorded: 2" in out.stdout


def test_after_a_tool_call_the_question_is_still_the_human_message(agent):
    from grpo_agent.agent import split_task

    chat = to_chat([HumanMessage("Why are pangolins trafficked?"),
                    AIMessage("", tool_calls=[{"name": "lookup", "args": {"q": "pangolin"}, "id": "c1"}]),
                    ToolMessage("scales and meat", tool_call_id="c1", name="lookup")])
    question, history = split_task(chat)
    assert question == "Why are pangolins trafficked?"
    sent = agent.messages(question, history, [])
    assert [m["role"] for m in sent] == ["system", "assistant", "user", "user"]  # tool result shown as a user turn
    assert sent[2]["content"] == "Result of tool lookup: scales and meat" and sent[-1]["content"].endswith(question)


def test_batch_and_async_calls_share_the_agent_and_its_store(agent):
    import asyncio

    model = GRPOChatModel(agent=agent)
    answers = model.batch([[HumanMessage("Why are pangolins trafficked?")], [HumanMessage("How many tigers?")]])
    answers.append(asyncio.run(model.ainvoke([HumanMessage("What harms sea turtle hatchlings?")])))
    ids = [a.response_metadata["group_id"] for a in answers]
    assert len(set(ids)) == 3 and {g.group_id for g in agent.store.groups()} == set(ids)


def test_forcing_a_tool_is_refused_clearly(agent):
    @tool
    def lookup(q: str) -> str:
        """Look something up."""
        return q

    with pytest.raises(ValueError, match="cannot force tool_choice"):
        GRPOChatModel(agent=agent).bind_tools([lookup], tool_choice="any")


def test_a_failed_run_leaves_no_steps_behind(agent):
    from langchain_core.runnables import RunnableLambda

    recorder = GRPORunRecorder(agent.store)

    def boom(_):
        raise RuntimeError("tool broke")

    chain = GRPOChatModel(agent=agent) | RunnableLambda(boom)
    with pytest.raises(RuntimeError):
        chain.invoke([HumanMessage("Why protect tigers?")], config={"callbacks": [recorder]})
    assert recorder.steps == [] and recorder.group_ids == []


# ----- episodes from a tool-calling agent the user wrote ------------------------------------------------

def test_a_tool_calling_run_becomes_one_episode_with_the_tool_results_fed_back_masked(agent, monkeypatch):
    import torch

    from grpo_agent.grpo import completion_logprobs
    from grpo_agent.integrations.langchain import collect_episodes
    from grpo_agent.records import Group
    from grpo_agent.updater import GRPOUpdater
    from grpo_agent.config import UpdateConfig

    policy = agent.policy
    said = iter(['{"tool": "lookup", "arguments": {"query": "tigers"}}', "Tigers number about 5,500.",
                 '{"tool": "lookup", "arguments": {"query": "lions"}}', "I do not know."])
    prompts = []

    def scripted(chats, k=1, prompt_ids=None, temperature=1.0, **kw):  # "samples" fixed texts, with real log-probs
        prompts.append(list(prompt_ids[0]))
        return [Group(chats[0], prompt_ids[0], [policy.completion(prompt_ids[0], next(said), temperature)])]

    monkeypatch.setattr(policy, "sample", scripted)

    @tool
    def lookup(query: str) -> str:
        """Look up facts about an animal."""
        return "Tigers number about 5,500 in the wild." if "tiger" in query else "No facts found."

    def run(model, question):  # a hand-written tool-calling loop, as LangChain's guides write one
        bound, messages = model.bind_tools([lookup]), [HumanMessage(question)]
        while True:
            ai = bound.invoke(messages)
            if not ai.tool_calls:
                return ai.content
            messages += [ai] + [lookup.invoke(call) for call in ai.tool_calls]

    group = collect_episodes(agent, "How many tigers are in the wild?", run, k=2)
    assert [c.text for c in group.completions] == ["Tigers number about 5,500.", "I do not know."]
    tok = policy.tokenizer
    for n, c in enumerate(group.completions):
        assert [t["role"] for t in c.turns] == ["assistant", "tool", "assistant"]
        full = group.prompt_token_ids + c.token_ids
        assert prompts[2 * n] == group.prompt_token_ids and full[: len(prompts[2 * n + 1])] == prompts[2 * n + 1]
        fed = tok.decode([t for t, m in zip(c.token_ids, c.mask) if not m])
        assert c.turns[1]["content"] in fed  # the tool's result went back as tokens the policy did not sample
        ids = torch.tensor([full])  # each sampled token's log-prob is the policy's in the whole multi-turn sequence
        logp, _ = completion_logprobs(policy.model, ids, torch.ones_like(ids), len(c.token_ids), 1.0)
        sampled = torch.tensor(c.mask, dtype=torch.bool)
        assert torch.allclose(logp[0][sampled], torch.tensor(c.logprobs)[sampled], atol=1e-4)
    grounding = [c.scores["grounding"] for c in group.completions]
    assert grounding[0] > grounding[1]  # each answer checked against what its own run's tool returned
    (stored,) = agent.store.groups(source="langchain")
    assert stored.completions == group.completions
    (metrics,) = GRPOUpdater(policy, UpdateConfig(learning_rate=1e-3, lora_r=4, beta=0.0)).train([stored])
    assert metrics["tokens"] == sum(sum(c.mask) for c in group.completions)


def test_the_langgraph_episodes_example_runs(tiny_model_dir, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "langgraph_episodes.py"), "--model",
                          str(tiny_model_dir), "--store", str(tmp_path / "store.sqlite")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "one update on 2 episode groups (4 episodes)" in out.stdout
    from grpo_agent.store import TrajectoryStore

    with TrajectoryStore(tmp_path / "store.sqlite") as store:
        groups = store.groups(source="langchain")
    assert len(groups) == 2 and all(c.mask is not None and c.turns for g in groups for c in g.completions)
