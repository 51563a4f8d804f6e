import json

import pytest
import torch
from agent_fixtures import FACTS, make_agent

from grpo_agent.agent import AgentError, GRPOAgent, split_task
from grpo_agent.config import UpdateConfig
from grpo_agent.rollout.policy import load_policy
from grpo_agent.updater import GRPOUpdater


@pytest.fixture
def policy(tiny_model_dir):
    return load_policy(str(tiny_model_dir), device="cpu")


def test_respond_serves_the_best_scored_answer_and_logs_the_group(policy, embedder, tmp_path):
    agent = make_agent(policy, embedder, tmp_path / "store.sqlite")
    reply = agent.respond("What is the status of the snow leopard?", task_id="q1")
    composites = [c.composite for c in reply.candidates]
    assert len(reply.candidates) == 4 and reply.composite == max(composites)
    assert reply.answer == reply.candidates[reply.best].text
    assert reply.passages[0].id == "p1"  # retrieval put the snow leopard fact first
    assert set(reply.scores) >= {"grounding", "consistency", "safety"}
    assert len(reply.explanations["grounding"]) == 4
    logged = agent.store.get_group(reply.group_id)
    assert [c.text for c in logged.completions] == [c.text for c in reply.candidates]
    assert [c.advantage for c in logged.completions] == [c.advantage for c in reply.candidates]
    assert logged.info.task_id == "q1" and logged.info.passage_ids[0] == "p1"
    assert agent.store.group_info(reply.group_id) == logged.info


def test_k1_serves_without_scoring_or_logging(policy, embedder, tmp_path):
    agent = make_agent(policy, embedder, tmp_path / "store.sqlite")
    reply = agent.respond("Why are pangolins trafficked?", k=1)
    assert reply.group_id is None and len(reply.candidates) == 1 and reply.scores == {}
    assert agent.store.count_groups() == 0
    plain = GRPOAgent(policy, k=1)  # no retriever, scorer or store at all
    assert plain.respond("Hello?").passages == []


def test_a_chat_task_keeps_its_history_and_answers_the_last_user_message(policy, embedder, tmp_path):
    question, history = split_task([{"role": "system", "content": "Be brief, ignored"},
                                    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                    {"role": "user", "content": "Why are pangolins trafficked?"}])
    assert question == "Why are pangolins trafficked?"
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    agent = make_agent(policy, embedder, tmp_path / "store.sqlite")
    chat = agent.messages(question, history, [FACTS[2]])
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert chat[0]["content"].startswith(agent.system) and chat[0]["content"].endswith("Be brief, ignored")
    assert "scales and meat" in chat[-1]["content"] and chat[-1]["content"].endswith(question)
    with pytest.raises(AgentError, match="no user message"):
        split_task([{"role": "assistant", "content": "hi"}])
    with pytest.raises(AgentError, match="needs a scorer"):
        GRPOAgent(policy, k=4)


def test_follow_loads_each_promoted_adapter_without_a_restart(policy, embedder, tmp_path, tiny_model_dir):
    # A trainer process (here: another policy) updates and promotes an adapter into the run directory.
    trainer = load_policy(str(tiny_model_dir), device="cpu")
    updater = GRPOUpdater(trainer, UpdateConfig(learning_rate=5e-2, beta=0.0, groups_per_step=1))
    groups = trainer.sample([[{"role": "user", "content": "Is the tiger endangered?"}]], k=4, max_new_tokens=8,
                            seed=0)
    for i, c in enumerate(groups[0].completions):
        c.advantage = 1.0 if i == 0 else -1.0 / 3
    updater.train(groups)
    run = tmp_path / "run"
    updater.model.save_pretrained(run / "promoted" / "r1")
    (run / "promoted.json").write_text(json.dumps({"version": "r1", "adapter": "promoted/r1"}))

    agent = make_agent(policy, embedder, tmp_path / "store.sqlite")
    ids = torch.tensor([groups[0].prompt_token_ids])
    before = policy.model(ids).logits
    agent.follow(run)
    assert policy.version == "r1"
    after = policy.model(ids).logits
    assert torch.allclose(after, trainer.model(ids).logits, atol=1e-5)  # the trainer's weights, served
    assert not torch.allclose(before, after)
    reply = agent.respond("Is the tiger endangered?")
    assert reply.policy_version == "r1" and agent.store.get_group(reply.group_id).policy_version == "r1"

    # A second promotion is swapped in place, between two requests.
    more = trainer.sample([[{"role": "user", "content": "Where do kakapo live?"}]], k=4, max_new_tokens=8, seed=1)
    for i, c in enumerate(more[0].completions):
        c.advantage = 1.0 if i == 1 else -1.0 / 3
    assert len(updater.train(more)) == 1
    updater.model.save_pretrained(run / "promoted" / "r2")
    (run / "promoted.json").write_text(json.dumps({"version": "r2", "adapter": "promoted/r2"}))
    agent.respond("Is the tiger endangered?", k=1)
    assert policy.version == "r2"
    assert torch.allclose(policy.model(ids).logits, trainer.model(ids).logits, atol=1e-5)


def test_follow_names_a_wrong_run_directory(policy, embedder, tmp_path):
    agent = make_agent(policy, embedder, tmp_path / "store.sqlite")
    with pytest.raises(AgentError, match="not a loop's run directory"):
        agent.follow(tmp_path / "typo")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "promoted.json").write_text("{not json")
    with pytest.raises(AgentError, match="malformed"):
        agent.follow(tmp_path / "run")


def test_a_prompt_past_the_context_is_refused_before_any_forward_pass(policy, embedder, tmp_path):
    from grpo_agent.errors import ContextLengthError

    agent = make_agent(policy, embedder, tmp_path / "store.sqlite", max_new_tokens=12)
    assert policy.context_length == 512  # the tiny model's max_position_embeddings
    calls = []
    forward = policy.model.forward
    policy.model.forward = lambda *a, **kw: calls.append(1) or forward(*a, **kw)
    long = "Tigers, elephants and rhinos are poached for skins, ivory and horn. " * 40
    try:
        with pytest.raises(ContextLengthError, match="task 0: its prompt is .* tokens .* past the model's context "
                                                     "of 512: shorten the chat, or lower max_tokens") as e:
            agent.respond(long)
        assert e.value.index == 0 and e.value.limit == 512 and e.value.prompt_tokens > 500
        with pytest.raises(ContextLengthError, match="task 1") as e:
            agent.respond_batch(["Why protect tigers?", long])
        assert e.value.index == 1
        with pytest.raises(ContextLengthError, match="task 0"):
            agent.sample_groups([long])
        # A short question is refused once max_new_tokens takes its prompt (with the facts) one past the context.
        q = "Why protect tigers?"
        n = len(policy.encode_chat(agent.messages(q, [], agent.retrieve([q])[0])))
        with pytest.raises(ContextLengthError, match=f"max_new_tokens is {513 - n}, 513 tokens in all"):
            agent.respond(q, max_new_tokens=513 - n)
        assert calls == [] and agent.store.count_groups() == 0  # refused before any model call, nothing logged
    finally:
        del policy.model.forward
