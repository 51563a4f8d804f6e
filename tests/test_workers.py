"""Rollout workers on a real local Ray cluster (127.0.0.1 only): the same groups for the same seeds whatever the
number of workers, a worker killed mid-round replaced with nothing lost or logged twice, and the workers
sampling from each adapter the loop promotes."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
from agent_fixtures import EVAL, FACTS, TASKS

from grpo_agent.agent import GRPOAgent
from grpo_agent.config import Config, LoopConfig, PolicyConfig, RetrievalConfig, SamplingConfig, UpdateConfig
from grpo_agent.errors import LoopError
from grpo_agent.loop import SelfImprovementLoop
from grpo_agent.retrieval import FactIndex
from grpo_agent.rollout.workers import Chunk, RolloutWorkers, start_ray

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (each pool started in it leaves it running): 3 CPUs, for a pool of
    one worker and one of two at once."""
    started = start_ray(num_cpus=3)
    import ray

    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def config(tiny_model_dir, embedder, tmp_path_factory):
    index = tmp_path_factory.mktemp("facts")
    FactIndex.build(FACTS, embedder).save(index)
    return Config(policy=PolicyConfig(model=str(tiny_model_dir), device="cpu"),
                  sampling=SamplingConfig(k=3, max_new_tokens=8, temperature=1.0, seed=7),
                  retrieval=RetrievalConfig(index=str(index), top_k=2),
                  update=UpdateConfig(learning_rate=5e-2, lora_r=8))


def chunks(seed: int) -> list[Chunk]:
    questions = [t["question"] for t in TASKS]
    return [Chunk(start, questions[start:start + 2], [t["id"] for t in TASKS[start:start + 2]], [None, None],
                  seed + start, {"round": 1}) for start in range(0, len(TASKS), 2)]


def sampled(entries) -> list[tuple]:
    """What a worker's groups say, comparable across processes."""
    return [(e["task_id"], e["prompt"], [(c.token_ids, round(c.composite, 6)) for c in e["group"].completions])
            for e in entries]


@pytest.fixture(scope="module")
def one(cluster, config):
    with RolloutWorkers(config, 1) as pool:  # never follows a run: samples from the base weights
        yield pool


@pytest.fixture(scope="module")
def two(cluster, config):
    with RolloutWorkers(config, 2) as pool:
        yield pool


def test_two_workers_give_the_same_groups_as_one_for_the_same_seeds(one, two):
    results = {}
    for pool in (one, two):
        assert len(set(pool.pids)) == pool.n and os.getpid() not in pool.pids
        got = list(pool.answer(chunks(seed=11)))
        assert [c.start for c, _ in got] == [0, 2, 4]  # in order, whichever worker finished first
        results[pool.n] = [x for _, entries in got for x in sampled(entries)]
    assert [r[0] for r in results[1]] == [t["id"] for t in TASKS]
    assert results[1] == results[2]
    assert len({tuple(map(tuple, (t for t, _ in r[2]))) for r in results[1]}) > 1  # not one group repeated
    other = [x for _, entries in one.answer(chunks(seed=12)) for x in sampled(entries)]  # another seed
    assert other != results[1]


def test_a_worker_killed_mid_round_is_replaced_and_nothing_is_lost_or_logged_twice(one, two, config, tmp_path):
    run = tmp_path / "run"
    loop_cfg = LoopConfig(tasks_per_round=6, eval_k=2, eval_size=2, margin=1.0)
    agent = GRPOAgent.from_config(config, store_path=run / "store.sqlite")
    killed = []

    def kill_the_first(i, chunk, pid):  # the first chunk handed out: its worker's process dies with it
        if not killed:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    two.on_submit = kill_the_first
    loop = SelfImprovementLoop(agent, run, TASKS, EVAL, config.update, loop_cfg, batch=2, progress=False,
                               workers=two)
    try:
        (row,) = loop.run(1)
    finally:
        two.on_submit = None
    assert two.replaced == 1 and killed[0] not in two.pids
    assert row["promoted"] and row["groups"] == 6
    groups = agent.store.groups(source="loop")
    assert [g.info.task_id for g in groups] == [t["id"] for t in TASKS]  # each task once, in order
    assert len({g.group_id for g in groups}) == 6 and {g.policy_version for g in groups} == {"base"}
    # Round 1's groups are those of its chunks answered by a worker that was never killed: none was corrupted.
    seeds = [(7 * 1_000_003 + start) % 2**31 for start in (0, 2, 4)]  # the loop's: sampling.seed and the cursor
    loop_chunks = [dataclasses.replace(c, seed=s) for c, s in zip(chunks(seed=0), seeds)]
    fresh = [e for _, entries in one.answer(loop_chunks) for e in entries]
    assert [[c.token_ids for c in e["group"].completions] for e in fresh] == \
        [[c.token_ids for c in g.completions] for g in groups]

    (row,) = loop.run(2)  # round 2 is sampled by the workers from the adapter round 1 promoted
    round2 = [g for g in agent.store.groups(source="loop") if g.info.meta.get("round") == 2]
    assert len(round2) == 6 and {g.policy_version for g in round2} == {"r1"}


def test_more_workers_than_the_cluster_holds_are_refused_up_front(cluster, config):
    started = time.monotonic()
    with pytest.raises(LoopError, match="free but 2 workers need 8 CPU"):
        RolloutWorkers(config, 2, cpus=4)
    assert time.monotonic() - started < 30


def test_with_max_staleness_the_workers_collect_the_next_round_during_this_ones_update(one, config, tmp_path):
    """(Uses the one-worker pool last: it follows this test's run from here on.)"""
    run = tmp_path / "run"
    agent = GRPOAgent.from_config(config, store_path=run / "store.sqlite")
    loop = SelfImprovementLoop(agent, run, TASKS, EVAL, config.update,
                               LoopConfig(tasks_per_round=4, eval_k=2, eval_size=2, margin=1.0, max_staleness=1),
                               batch=2, progress=False, workers=one)
    handed = []  # (the chunk's round, the round the loop had finished then)
    one.on_submit = lambda i, chunk, pid: handed.append((chunk.meta["round"], loop.state.round))
    try:
        rows = loop.run(2)
    finally:
        one.on_submit = None
    assert [r for r, _ in handed] == [1, 1, 2, 2]  # round 3 is not collected: run(2) ends at round 2
    assert (2, 0) in handed  # a chunk of round 2 went out before round 1 was gated: during its update or eval
    groups = agent.store.groups(source="loop")
    assert [g.info.task_id for g in groups] == [t["id"] for t in (TASKS * 2)[:8]]  # each once, in order
    assert len({g.group_id for g in groups}) == 8
    round2 = [g for g in groups if g.info.meta["round"] == 2]
    assert {g.policy_version for g in round2} <= {"base", "r1"}  # what was promoted when a worker took each chunk
    assert rows[1]["promoted"] and rows[1]["stale_groups"] == 0 and rows[1]["groups"] == 4  # one promotion back
    assert agent.store.groups(unconsumed=True, source="loop") == []
