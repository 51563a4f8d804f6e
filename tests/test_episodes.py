"""Multi-turn tool-use episodes: token ids kept as sampled across turns, the tool's results fed back masked, scored on
the final answer with the facts each episode retrieved, and trained on exactly the ids that were sampled."""

from __future__ import annotations

import pytest
import torch
from agent_fixtures import EVAL, FACTS, TASKS, make_agent

from grpo_agent.config import EpisodeConfig, LoopConfig, UpdateConfig
from grpo_agent.episodes import ANSWER, SEARCH, EpisodeRunner, SearchTool
from grpo_agent.errors import ConfigError, LoopError
from grpo_agent.evaluation import episode_monitors
from grpo_agent.grpo import completion_logprobs
from grpo_agent.loop import SelfImprovementLoop
from grpo_agent.records import Completion, Group
from grpo_agent.report import write_report
from grpo_agent.retrieval import FactIndex
from grpo_agent.rollout.policy import load_policy
from grpo_agent.scoring import ScoreContext
from grpo_agent.updater import GRPOUpdater, collate, trainable_rows

QUESTIONS = ["What is the status of the snow leopard?", "How many tigers are in the wild?"]


@pytest.fixture
def policy(tiny_model_dir):
    return load_policy(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def index(embedder):
    return FactIndex.build(FACTS, embedder)


def run(policy, index, seed=3, k=4, turns=3):
    runner = EpisodeRunner(policy, SearchTool(index, top_k=2), max_turns=turns, max_new_tokens=8, query_tokens=6)
    return runner.run(QUESTIONS, k=k, seed=seed)


def test_an_episode_keeps_every_sampled_token_with_its_log_prob_and_masks_what_was_fed_back(policy, index):
    groups, retrieved = run(policy, index)
    episodes = [c for g in groups for c in g.completions]
    assert {t.get("action") for c in episodes for t in c.turns} >= {"search", "answer"}  # both happened
    tok = policy.tokenizer
    for g, facts in zip(groups, retrieved):
        for c, got in zip(g.completions, facts):
            assert len(c.mask) == len(c.token_ids) == len(c.logprobs) and c.mask[0] == 1  # opens with a choice
            assert c.token_ids[0] in {tok.encode(w, add_special_tokens=False)[0] for w in (SEARCH, ANSWER)}
            searches = [t for t in c.turns if t["role"] == "tool"]
            assert [p.id for p in got] == list(dict.fromkeys(i for t in searches for i in t["passage_ids"]))
            fed = tok.decode([t for t, m in zip(c.token_ids, c.mask) if not m])
            for t in searches:  # each result went back to the policy as tokens it did not sample
                assert t["content"] in fed
            assert c.turns[-1]["action"] == "answer" and c.text in c.turns[-1]["content"]
            # The sampled log-probs are what the policy gives each sampled token in the full sequence: the
            # contexts it sampled from are exactly prompt + the episode's ids, turn after turn.
            ids = torch.tensor([g.prompt_token_ids + c.token_ids])
            logp, _ = completion_logprobs(policy.model, ids, torch.ones_like(ids), len(c.token_ids), 1.0)
            sampled = torch.tensor(c.mask, dtype=torch.bool)
            assert torch.allclose(logp[0][sampled], torch.tensor(c.logprobs)[sampled], atol=1e-4)
            assert all(lp == 0.0 for lp, m in zip(c.logprobs, c.mask) if not m)


def test_the_same_seed_gives_the_same_episodes(policy, index):
    first, _ = run(policy, index, seed=5)
    again, _ = run(policy, index, seed=5)
    other, _ = run(policy, index, seed=6)
    ids = lambda gs: [c.token_ids for g in gs for c in g.completions]  # noqa: E731
    assert ids(first) == ids(again) and ids(first) != ids(other)


def test_exploring_episodes_search_first_with_the_opening_word_fed_and_the_query_sampled(policy, index):
    runner = EpisodeRunner(policy, SearchTool(index, top_k=2), max_turns=3, max_new_tokens=8, query_tokens=6)
    groups, retrieved = runner.run(QUESTIONS, k=4, seed=3, explore=2)
    tok = policy.tokenizer
    search_ids = tok.encode(SEARCH, add_special_tokens=False)
    words = {tok.encode(w, add_special_tokens=False)[0] for w in (SEARCH, ANSWER)}
    for g, facts in zip(groups, retrieved):
        for i, (c, got) in enumerate(zip(g.completions, facts)):
            if i < 2:  # the group's others choose, as without exploring
                assert c.mask[0] == 1 and c.token_ids[0] in words
                continue
            n = len(search_ids)
            if sum(t["role"] == "tool" for t in c.turns) == 1:  # the forced search is not counted as its choice
                assert episode_monitors([c])["search_rate"] == 0.0 and episode_monitors([c])["tool_calls"] == 1.0
            assert c.token_ids[:n] == search_ids and c.mask[:n] == [0] * n  # fed: not trained on
            assert c.turns[0]["action"] == "search" and c.turns[0]["forced"] and c.turns[1]["role"] == "tool"
            assert c.turns[1].get("error") or got  # it searched (or its query was empty: a tool error)
            first = c.mask.index(0, n)  # the query sampled after the fed word, up to the result fed back
            assert first > n and all(c.mask[n:first])
            ids = torch.tensor([g.prompt_token_ids + c.token_ids])
            logp, _ = completion_logprobs(policy.model, ids, torch.ones_like(ids), len(c.token_ids), 1.0)
            sampled = torch.tensor(c.mask, dtype=torch.bool)
            assert torch.allclose(logp[0][sampled], torch.tensor(c.logprobs)[sampled], atol=1e-4)
    plain, _ = runner.run(QUESTIONS, k=4, seed=3)
    again, _ = runner.run(QUESTIONS, k=4, seed=3, explore=0)
    assert [c.token_ids for g in plain for c in g.completions] == [c.token_ids for g in again for c in g.completions]
    with pytest.raises(ValueError, match="fewer than k"):
        runner.run(QUESTIONS, k=2, explore=2)


@pytest.mark.parametrize("share_prefix", [False, True])
def test_the_update_trains_on_the_sampled_token_ids_byte_for_byte_across_turns(policy, index, tmp_path, embedder,
                                                                               share_prefix):
    agent = make_agent(policy, embedder, tmp_path / "store.sqlite", k=4)
    groups, retrieved = run(policy, index)
    for g, facts in zip(groups, retrieved):
        agent.scorer.score_episodes(g, ScoreContext(g.messages[-1]["content"]), facts)
    agent.scorer.assign_rewards(groups, [[float(i) for i in range(len(g.completions))] for g in groups])
    for g in groups:
        agent.store.log_group(g, prompt=g.messages[-1]["content"], source="loop")
    stored = agent.store.groups(source="loop")
    assert [c for g in stored for c in g.completions] == [c for g in groups for c in g.completions]
    completions = [c for g in stored for c in g.completions]

    rows = [r for rs in trainable_rows(stored)[0] for r in rs]
    batch = collate(rows, policy.pad_token_id, torch.device("cpu"), shared=share_prefix)
    for i, (r, c) in enumerate(zip(rows, completions)):
        assert batch["mask"][i, : len(c.mask)].tolist() == [float(m) for m in c.mask]  # tool tokens masked out
        assert batch["mask"][i, len(c.mask):].sum() == 0
    seen = []
    updater = GRPOUpdater(policy, UpdateConfig(learning_rate=1e-3, groups_per_step=2, lora_r=4, beta=0.0,
                                               share_prefix=share_prefix))
    hook = updater.model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["input_ids"].clone()),
                                                   with_kwargs=True)
    try:
        (metrics,) = updater.train(stored)
    finally:
        hook.remove()
    fed = sorted(row[row != policy.pad_token_id].tolist() for x in seen for row in x)
    if share_prefix:  # each prompt once, then each episode's tokens but its last (which predicts nothing)
        t = batch["completion_ids"].shape[1]
        assert fed == sorted([g.prompt_token_ids for g in stored] + [c.token_ids[: t - 1] for c in completions])
        for i, c in enumerate(completions):  # the ids trained on: the prompt and the episode as sampled
            prompt = batch["prompt_ids"][batch["owner"][i]]
            assert prompt[batch["prompt_mask"][batch["owner"][i]].bool()].tolist() == stored[i // 4].prompt_token_ids
            assert batch["completion_ids"][i, : len(c.token_ids)].tolist() == c.token_ids
    else:
        assert fed == sorted(g.prompt_token_ids + c.token_ids for g in stored for c in g.completions)
    assert metrics["tokens"] == sum(sum(c.mask) for g in stored for c in g.completions)  # the sampled ones only


def test_episodes_are_scored_with_the_facts_each_retrieved(embedder):
    from grpo_agent.config import ScoringConfig
    from grpo_agent.scoring import build_self_scorer

    scorer = build_self_scorer(ScoringConfig(weights={"grounding": 1.0, "consistency": 0.0}), embedder=embedder)
    answer = "The snow leopard is listed as Vulnerable by the IUCN."
    turn = [{"role": "assistant", "content": f"Answer: {answer}", "action": "answer"}]
    error = [{"role": "assistant", "content": "Search:", "action": "search", "query": ""},
             {"role": "tool", "name": "search", "content": "error", "error": True}] + turn
    episodes = [Completion(answer, [1], [-0.1], "stop", mask=[1], turns=t) for t in (turn, turn, error)]
    group = Group([{"role": "user", "content": "q"}], [1], episodes)
    retrieved = [[FACTS[0]], [], [FACTS[0]]]  # the second episode looked nothing up
    scored = scorer.score_episodes(group, ScoreContext("Is the snow leopard endangered?"), retrieved,
                                   tool_error_penalty=0.5)
    grounding = scored.signals["grounding"]
    assert grounding[0] > 0.8 and grounding[1] == 0.0  # the same answer, grounded only where facts were found
    assert scored.composite[2] == pytest.approx(0.5 * scored.composite[0])  # the tool error's cost
    assert scored.ranking[0] == 0 and group.completions[1].scores["grounding"] == 0.0


def test_the_loop_trains_on_episode_groups_and_reports_their_tool_use(policy, embedder, tmp_path):
    agent = make_agent(policy, embedder, tmp_path / "run" / "store.sqlite", k=3, max_new_tokens=8)
    agent.episodes = EpisodeConfig(max_turns=2, search_top_k=1, query_tokens=6, explore=1)  # fits the 512 context
    loop = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UpdateConfig(learning_rate=5e-3, lora_r=4),
                               LoopConfig(tasks_per_round=4, eval_k=2, margin=1.0, unit="episode"), batch=2,
                               progress=False)
    (row,) = loop.run(1)
    assert row["groups"] == 4 and row["episodes"] == 12 and row["steps"] >= 1
    assert 1.0 <= row["turns"] <= 2.0 and row["tool_calls"] == pytest.approx(row["turns"] - 1.0)
    groups = agent.store.groups(source="loop")
    assert all(c.mask is not None and c.turns for g in groups for c in g.completions)
    assert all(g.completions[-1].turns[0]["action"] == "search" for g in groups)  # each group's exploring episode
    assert loop.state.eval_identity["unit"] == "episode"
    report = write_report(tmp_path / "run").read_text()
    assert "tool calls / episode" in report
    with pytest.raises(ValueError, match="loop.unit"):
        LoopConfig(unit="turn")
    agent.episodes = EpisodeConfig(explore=3)
    with pytest.raises(LoopError, match="episodes.explore"):
        SelfImprovementLoop(agent, tmp_path / "run2", TASKS, EVAL, UpdateConfig(lora_r=4), LoopConfig(unit="episode"))
    with pytest.raises(ConfigError, match="episodes.explore"):
        EpisodeConfig(explore=-1)
    with pytest.raises(ConfigError, match="max_turns >= 2"):
        EpisodeConfig(explore=1, max_turns=1)
