import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from agent_fixtures import EVAL, TASKS, make_agent

from grpo_agent.config import LoopConfig, UpdateConfig
from grpo_agent.loop import LoopError, SelfImprovementLoop, gate
from grpo_agent.rollout.policy import load_policy
from grpo_agent.report import write_report
from grpo_agent.rundir import EvalResult

UPDATE = UpdateConfig(learning_rate=5e-3, groups_per_step=1, beta=0.04)


@pytest.fixture
def policy(tiny_model_dir):
    return load_policy(str(tiny_model_dir), device="cpu")


def adapter_weights(policy):
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" in n}


def test_the_whole_loop_collects_updates_evaluates_gates_and_reports(policy, embedder, tmp_path, monkeypatch):
    agent = make_agent(policy, embedder, tmp_path / "run" / "store.sqlite")
    loop = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UPDATE,
                               LoopConfig(tasks_per_round=3, eval_k=2, label_free=True), progress=False)
    # The real label-free eval runs for the baseline and round 1; round 2's eval is made to drop so that
    # the gate must roll it back.
    real_eval, calls = loop.evaluate, []

    def eval_then_drop():
        result = real_eval()
        calls.append(result)
        return dataclasses.replace(result, value=-1.0) if len(calls) == 3 else result

    monkeypatch.setattr(loop, "evaluate", eval_then_drop)
    loop.cfg.margin = 1.0  # round 1 always promotes (a composite moves by less than 1)
    rows = loop.run(1)
    assert rows[0]["promoted"] and rows[0]["policy_version"] == "r1" and rows[0]["steps"] >= 1
    assert calls[0].metric == "composite" and 0 <= calls[0].value <= 1
    promoted_r1 = adapter_weights(policy)
    assert any(w.abs().sum() > 0 for n, w in promoted_r1.items() if "lora_B" in n)  # the update moved

    loop.cfg.margin = 0.0
    rows = loop.run(2)  # one more round: its eval "drops", so it is rolled back to r1
    assert not rows[0]["promoted"] and "rolled back" in rows[0]["reason"]
    assert all(torch.equal(promoted_r1[n], w) for n, w in adapter_weights(policy).items())
    assert policy.version == "r1"
    assert json.loads((tmp_path / "run" / "promoted.json").read_text())["version"] == "r1"

    store = agent.store
    assert store.count_groups(source="loop") == 6  # 3 tasks a round, 2 rounds
    updates = store.updates()
    assert [u.promoted for u in updates] == [True, False]
    assert store.consumed_group_ids() == {g.group_id for g in store.groups(source="loop")}
    assert [r["round"] for r in loop.rounds()] == [0, 1, 2]

    report = write_report(tmp_path / "run", extra={"before": {"metric": "accuracy", "value": 0.1, "n": 2}})
    text = report.read_text()
    assert "2 rounds: 1 promoted, 1 rolled back" in text and "| before | accuracy | 0.100 | 2 |" in text
    assert "| round | entropy | answer tokens |" in text
    assert f"- round 2: {rows[0]['reason']}" in text  # the gate's reason for rolling round 2 back
    for png in ("eval.png", "scores.png", "kl.png", "monitors.png"):
        assert (report.parent / png).stat().st_size > 1000


def test_a_loop_needs_tasks_an_eval_set_and_a_store(policy, embedder, tmp_path):
    agent = make_agent(policy, embedder, tmp_path / "store.sqlite")
    with pytest.raises(LoopError, match="eval set"):
        SelfImprovementLoop(agent, tmp_path / "run", TASKS, [], UPDATE)
    agent.store = None
    with pytest.raises(LoopError, match="store"):
        SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UPDATE)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from agent_fixtures import EVAL, TASKS, make_agent
from grpo_agent.config import LoopConfig, UpdateConfig
from grpo_agent.loop import SelfImprovementLoop
from grpo_agent.rollout.policy import load_policy
from grpo_agent.rundir import EvalResult
from grpo_agent.retrieval import Embedder
import grpo_agent.updater as updater

mode = sys.argv[1]
kill_after = int(mode) if mode.isdigit() else 0
if mode == "gate":  # the eval drops (a rollback), and the process dies right after the update is recorded
    from grpo_agent.store import TrajectoryStore
    SelfImprovementLoop.evaluate = lambda self: EvalResult("composite", 0.5 if self.state.promoted_eval is None
                                                           else 0.1, 2)
    record = TrajectoryStore.record_update
    def record_then_die(self, **kw):
        record(self, **kw)
        os.kill(os.getpid(), signal.SIGKILL)
    TrajectoryStore.record_update = record_then_die
if kill_after:
    original = updater.GRPOUpdater.save_checkpoint
    def save_then_die(self, *a, **k):
        path = original(self, *a, **k)
        if self.step >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as a power cut: no cleanup runs
        return path
    updater.GRPOUpdater.save_checkpoint = save_then_die
agent = make_agent(load_policy({model!r}, device="cpu"), Embedder(), {run!r} + "/store.sqlite")
loop = SelfImprovementLoop(agent, {run!r}, TASKS, EVAL, UpdateConfig(learning_rate=5e-3, groups_per_step=1),
                           LoopConfig(tasks_per_round=4, eval_k=2, margin=0.0 if mode == "gate" else 1.0),
                           progress=False)
loop.run(1)
lora_b = sum(float(p.abs().sum()) for n, p in loop.updater.model.named_parameters() if "lora_B" in n)
print("steps", loop.updater.step, "lora_b", lora_b)
"""


def loop_process(tiny_model_dir, run):
    """Runs KILLED_RUN for `run` in a fresh process with a mode ("2": killed after step 2, "gate": killed
    right after the update is recorded, "0": runs to the end)."""
    script = run.parent / "run_loop.py"
    script.write_text(KILLED_RUN.format(tests=str(Path(__file__).parent), model=str(tiny_model_dir), run=str(run)))
    return lambda mode: subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                                       timeout=300)


def test_killing_the_loop_mid_update_loses_nothing_and_resumes_from_the_checkpoint(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run_loop = loop_process(tiny_model_dir, run)

    killed = run_loop("2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    from grpo_agent.store import TrajectoryStore

    with TrajectoryStore(run / "store.sqlite") as store:
        logged = {g.group_id for g in store.groups()}
        assert len(logged) == 4 and store.updates() == []  # all collected, the round not finished
    steps_before = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_before == [1, 2]

    resumed = run_loop("0")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2] and steps[2] == 3 and steps == sorted(set(steps))  # no step repeated
    with TrajectoryStore(run / "store.sqlite") as store:
        assert {g.group_id for g in store.groups()} == logged  # nothing lost, nothing collected twice
        (update,) = store.updates()
        usable = [g for g in store.groups() if not g.zero_variance]
        assert set(update.group_ids) == logged and steps[-1] == len(usable)
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["steps"] == len(usable)  # all steps, both processes


def test_a_kill_during_the_gate_finishes_that_gate_on_restart(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run_loop = loop_process(tiny_model_dir, run)
    killed = run_loop("gate")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((run / "state.json").read_text())["pending"]["promoted"] is False

    resumed = run_loop("0")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.split()[-1] == "0.0"  # rolled back to the base: every LoRA B is zero again
    from grpo_agent.store import TrajectoryStore

    with TrajectoryStore(run / "store.sqlite") as store:
        assert [(u.round, u.promoted) for u in store.updates()] == [(1, False)]  # recorded once
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["promoted"]) for r in rows] == [(0, True), (1, False)]
    state = json.loads((run / "state.json").read_text())
    assert state["round"] == 1 and state["pending"] is None and state["promoted_version"] == "base"
    assert json.loads((run / "promoted.json").read_text())["version"] == "base"


def test_client_feedback_reshapes_the_advantages_the_update_trains_on_and_the_store_keeps_them(policy, embedder,
                                                                                             tmp_path):
    agent = make_agent(policy, embedder, tmp_path / "run" / "store.sqlite")
    agent.scorer.feedback_weight = 1.0  # scoring.feedback_weight: the rating replaces the composite
    loop = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UPDATE, LoopConfig(tasks_per_round=1, margin=1.0),
                               progress=False)
    replies = agent.respond_batch([t["question"] for t in TASKS[:2]], source="loop")  # logged, not yet trained on
    served = replies[0].best
    agent.store.add_feedback(replies[0].group_id, 0.0, text="wrong")  # the served answer was bad
    before = [c.advantage for c in agent.store.get_group(replies[1].group_id).completions]
    (row,) = loop.run(1)
    rated, untouched = (agent.store.get_group(r.group_id) for r in replies)
    assert rated.completions[served].composite == 0.0
    assert rated.completions[served].advantage == min(c.advantage for c in rated.completions)
    assert [c.advantage for c in untouched.completions] == pytest.approx(before)
    (update,) = agent.store.updates()
    assert {r.group_id for r in replies} <= set(update.group_ids)  # the update trained on what the store now holds


def test_a_restart_after_the_write_back_does_not_blend_the_ratings_twice(policy, embedder, tmp_path, monkeypatch):
    agent = make_agent(policy, embedder, tmp_path / "run" / "store.sqlite")
    loop = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UPDATE, LoopConfig(tasks_per_round=1, margin=1.0),
                               progress=False)
    (reply,) = agent.respond_batch([TASKS[3]["question"]], source="loop")
    agent.store.add_feedback(reply.group_id, 0.0)  # the served answer was bad
    raw = reply.candidates[reply.best].composite

    def killed(r, groups):  # the process dies once the blended scores are in the store, before any step
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "update", killed)
    with pytest.raises(KeyboardInterrupt):
        loop.run(1)
    blended = agent.store.get_group(reply.group_id).completions[reply.best].composite
    assert blended == pytest.approx(0.5 * raw)  # scoring.feedback_weight 0.5, rating 0
    restarted = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UPDATE,
                                    LoopConfig(tasks_per_round=1, margin=1.0), progress=False)
    (row,) = restarted.run(1)
    assert row["steps"] >= 1
    assert agent.store.get_group(reply.group_id).completions[reply.best].composite == pytest.approx(blended)


def test_the_loop_takes_its_mode_from_its_config(policy, embedder, tmp_path):
    from grpo_agent.errors import ConfigError

    agent = make_agent(policy, embedder, tmp_path / "run" / "store.sqlite")
    with pytest.raises(LoopError, match="training-free mode needs an agent with an ExperienceLibrary"):
        SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UPDATE, LoopConfig(mode="training-free"))
    with pytest.raises(ConfigError, match="update.lora = true"):  # a check across [loop] and [update]
        SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UpdateConfig(lora=False), LoopConfig())
    assert not (tmp_path / "run" / "state.json").exists()


class Shortest:
    """A degenerate reward: the shorter the answer, the better (what a collapsing run converges to)."""

    name = "shortest"

    def score(self, group, context):
        from grpo_agent.scoring import ScoreResult

        longest = max(len(c.token_ids) for c in group.completions)
        return ScoreResult("shortest", [1 - len(c.token_ids) / (longest + 1) for c in group.completions],
                           ["shorter is better"] * len(group.completions))


def test_the_significance_gate_promotes_only_a_gain_clear_of_the_paired_noise():
    def result(values):
        return EvalResult("composite", sum(values) / len(values), len(values), values)

    before = [0.5, 0.6, 0.4, 0.7]
    steady = result([0.52, 0.62, 0.42, 0.72])  # +0.02 on every task: no noise at all
    noisy = result([0.9, 0.2, 0.8, 0.4])  # +0.025 on average, but task by task all over the place
    assert gate(steady, 0.55, before, min_gain_z=1.0)[0]
    promoted, reason = gate(noisy, 0.55, before, min_gain_z=1.0)
    assert not promoted and "x SE" in reason and reason.endswith("rolled back")
    assert gate(noisy, 0.55, before, min_gain_z=0.0)[0]  # the plain gate: no gain needed
    assert gate(noisy, 0.55, before, margin=0.5, min_gain_z=1.0)[0]  # a margin forgives the shortfall
    with pytest.raises(LoopError, match="min_gain_z = 0"):
        gate(noisy, 0.55, None, min_gain_z=1.0)
    # Gold accuracy, one question more right and none less: a gain of exactly one standard error (1/n), at
    # every eval size, which z = 1 promotes and z = 1.01 does not; never left to floating-point rounding.
    for n in range(2, 41):
        base = [float(i % 5 < 3) for i in range(n)]
        better = base.copy()
        better[base.index(0.0) if 0.0 in base else 0] = 1.0
        if better == base:
            continue
        assert gate(result(better), sum(base) / n, base, min_gain_z=1.0)[0], n
        assert not gate(result(better), sum(base) / n, base, min_gain_z=1.01)[0], n


def test_a_loop_with_the_significance_gate_rolls_back_a_gain_inside_the_noise(policy, embedder, tmp_path,
                                                                               monkeypatch):
    agent = make_agent(policy, embedder, tmp_path / "run" / "store.sqlite")
    loop = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UPDATE,
                               LoopConfig(tasks_per_round=2, eval_k=2, min_gain_z=50.0), progress=False)
    real_eval = loop.evaluate

    def slightly_better():  # the real eval, each task a hair better than the baseline, by varying amounts
        result = real_eval()
        if loop.state.promoted_eval is None:
            return result
        values = [v + 0.001 * (i % 3) for i, v in enumerate(loop.state.promoted_values)]
        return dataclasses.replace(result, values=values, value=sum(values) / len(values))

    monkeypatch.setattr(loop, "evaluate", slightly_better)
    (row,) = loop.run(1)
    assert row["eval"]["value"] > loop.rounds()[0]["eval"]["value"]  # it did rise...
    assert not row["promoted"] and "50.0 x SE" in row["reason"]  # ...by less than 50 standard errors
    assert loop.state.promoted_values == loop.rounds()[0]["eval"]["values"]  # still the baseline's

    def clearly_better():  # every task 0.2 better than the promoted policy's, give or take 0.001
        result = real_eval()
        values = [v + 0.2 + 0.001 * (i % 3) for i, v in enumerate(loop.state.promoted_values)]
        return dataclasses.replace(result, values=values, value=sum(values) / len(values))

    monkeypatch.setattr(loop, "evaluate", clearly_better)
    (row,) = loop.run(2)
    assert row["promoted"] and loop.state.promoted_values == row["eval"]["values"]  # the next gate pairs with r2
    assert len(row["eval"]["values"]) == row["eval"]["n"] == len(EVAL)

    other_draws = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UPDATE,
                                      LoopConfig(tasks_per_round=2, eval_k=3), progress=False)
    with pytest.raises(LoopError, match="would not compare"):  # 3 samples a task would not pair with 2
        other_draws.run(3)

    state = json.loads((tmp_path / "run" / "state.json").read_text())
    state.pop("promoted_values")  # a run directory from before min_gain_z: refused before any work
    (tmp_path / "run" / "state.json").write_text(json.dumps(state))
    again = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UPDATE,
                                LoopConfig(tasks_per_round=2, eval_k=2, min_gain_z=1.0), progress=False)
    groups, cursor = agent.store.count_groups(), again.state.cursor
    with pytest.raises(LoopError, match="no per-task scores"):
        again.run(3)
    assert agent.store.count_groups() == groups and again.state.cursor == cursor  # nothing collected
    with pytest.raises(LoopError, match="needs at least 2 eval tasks"):
        SelfImprovementLoop(agent, tmp_path / "one", TASKS, EVAL[:1], UPDATE,
                            LoopConfig(tasks_per_round=2, eval_k=2, min_gain_z=1.0), progress=False)
    assert not (tmp_path / "one").exists()


def degenerate_loop(policy, embedder, run, **guards):
    from grpo_agent.scoring import SelfScorer

    agent = make_agent(policy, embedder, run / "store.sqlite", k=4, max_new_tokens=12)
    agent.sampling.seed = None  # fresh draws every round
    agent.scorer = SelfScorer([Shortest()], {"shortest": 1.0})
    update = UpdateConfig(learning_rate=3e-2, beta=0.0, groups_per_step=1, num_iterations=4)
    return SelfImprovementLoop(agent, run, TASKS, EVAL, update, LoopConfig(
        tasks_per_round=3, eval_k=2, margin=1.0, **guards), progress=False)


def test_guards_roll_back_a_collapsing_run_and_say_why(policy, embedder, tmp_path, monkeypatch):
    loop = degenerate_loop(policy, embedder, tmp_path / "run", min_length_ratio=0.5, min_entropy_ratio=0.5,
                           min_distinct_ratio=0.5, stop_after_rollbacks=2)
    real_eval, calls = loop.evaluate, []

    def collapsing_eval():  # the real eval, its samples' monitors shrunk as a collapsing policy's would be
        result = real_eval()
        calls.append(result)
        shrink = {0: 1.0, 1: 0.9, 2: 0.3}.get(len(calls) - 1, 0.2)
        result.monitors = {k: v * (shrink if k != "entropy" or len(calls) > 3 else 1.0)
                              for k, v in result.monitors.items()}
        return result

    monkeypatch.setattr(loop, "evaluate", collapsing_eval)
    rows = loop.run(6)
    assert rows[0]["promoted"] and not rows[0]["guards"]  # 0.9 of the best: within every guard
    assert "guard min_distinct_ratio" in rows[1]["reason"] and "guard min_length_ratio" in rows[1]["reason"]
    assert "guard min_entropy_ratio" not in rows[1]["reason"]  # entropy held in that round
    assert "guard min_entropy_ratio" in rows[2]["reason"] and not rows[2]["promoted"]
    assert len(rows) == 3 and "stop_after_rollbacks" in loop.state.stopped  # two rollbacks in a row: stopped
    assert loop.state.promoted_version == "r1"
    assert "guard min_length_ratio" in write_report(tmp_path / "run").read_text()


def test_the_kl_cap_rolls_back_an_update_that_moves_too_far(policy, embedder, tmp_path):
    agent = make_agent(policy, embedder, tmp_path / "run" / "store.sqlite")
    loop = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UPDATE,
                               LoopConfig(tasks_per_round=4, eval_k=2, margin=1.0, max_kl=1e-9), progress=False)
    (row,) = loop.run(1)
    assert row["steps"] >= 2 and row["kl_last"] > 1e-9
    assert not row["promoted"] and row["guards"][0].startswith("guard max_kl: KL")
    assert all(float(p.detach().abs().sum()) == 0 for n, p in loop.updater.model.named_parameters() if "lora_B" in n)


class LowTokenIds:
    """A degenerate reward a policy can game: the lower its answer's token ids, the better."""

    name = "low_ids"

    def score(self, group, context):
        from grpo_agent.scoring import ScoreResult

        scores = [1 - sum(c.token_ids) / (len(c.token_ids) * 320) for c in group.completions]
        return ScoreResult("low_ids", scores, ["lower ids are better"] * len(scores))


def test_the_entropy_guard_catches_a_real_collapse(policy, embedder, tmp_path):
    from grpo_agent.scoring import SelfScorer

    agent = make_agent(policy, embedder, tmp_path / "run" / "store.sqlite", k=4, max_new_tokens=12)  # seeded
    agent.scorer = SelfScorer([LowTokenIds()], {"low_ids": 1.0})
    # LoRA on the output layer too, so that the tiny model's near-uniform distribution can collapse. These settings
    # collapse it onto low ids within a few rounds for every LoRA seed tried (0-3), entropy and distinct answers
    # falling together; a guard at 0.05 of the entropy fires only once it has (the lowest entropy before a full
    # collapse was 0.11 of the baseline). lr 5e-2 with 2 iterations diverged to high ids on some machines.
    update = UpdateConfig(learning_rate=4e-2, beta=0.0, groups_per_step=1, num_iterations=4,
                          lora_target_modules=["q_proj", "v_proj", "lm_head"])
    loop = SelfImprovementLoop(agent, tmp_path / "run", TASKS * 4, EVAL, update, LoopConfig(
        tasks_per_round=4, eval_k=4, margin=1.0, min_entropy_ratio=0.05, min_distinct_ratio=0.5,
        stop_after_rollbacks=1), progress=False)
    rows = loop.run(8)
    baseline = loop.rounds()[0]["eval"]["monitors"]["entropy"]
    last = rows[-1]
    assert last["eval"]["value"] > loop.rounds()[0]["eval"]["value"]  # the gamed score rose: the gate alone promotes
    assert "guard min_entropy_ratio" in last["reason"] and not last["promoted"]
    assert last["eval"]["monitors"]["entropy"] < 0.5 * baseline
    assert "guard min_distinct_ratio" in last["reason"]  # the collapsed policy repeats itself across a group too
    assert last["eval"]["monitors"]["distinct_rate"] < 0.5 * loop.rounds()[0]["eval"]["monitors"]["distinct_rate"]
    assert "stop_after_rollbacks" in loop.state.stopped


def test_the_reference_reset_anchors_the_kl_to_the_promoted_policy(policy, embedder, tmp_path, tiny_model_dir):
    from grpo_agent.grpo import completion_logprobs
    from grpo_agent.updater import collate, trainable_rows

    run = tmp_path / "run"
    cfg = LoopConfig(tasks_per_round=2, eval_k=2, margin=1.0, reference_reset_every=2)
    agent = make_agent(policy, embedder, run / "store.sqlite")
    loop = SelfImprovementLoop(agent, run, TASKS, EVAL, UPDATE, cfg, progress=False)
    rows = loop.run(3)
    assert [r["promoted"] for r in rows] == [True, True, True]
    assert [r["reference"] for r in rows] == ["base", "base", "r2"]  # reset at the start of round 3
    steps = read_steps(run)
    start = [sum(x["steps"] for x in rows[:i]) for i in range(len(rows))]
    assert rows[2]["steps"] >= 2
    assert steps[start[1]]["kl"] > 0  # round 2 starts from r1's adapter, still measured against the base
    assert steps[start[2]]["kl"] == 0.0  # round 3's reference is the policy it starts from ...
    assert steps[start[2] + 1]["kl"] > 0  # ... and the policy moves away from it
    r2 = load_policy_adapter(policy, run / "promoted" / "r2")
    assert all(torch.equal(a, b) for a, b in zip(loop.updater.ref_adapter, r2))

    # the reference pass reads r2's weights and puts the policy's back, bit for bit
    updater = loop.updater
    batch = collate(trainable_rows(agent.store.groups())[0][0], policy.pad_token_id, policy.device)
    t = batch["mask"].shape[1]
    before = [p.detach().clone() for p in updater.params]
    with torch.no_grad():
        ref = updater._reference_logprobs(batch, 1.0)
        assert all(torch.equal(a, b) for a, b in zip(before, updater.params))
        assert not torch.equal(ref, completion_logprobs(policy.model, batch["input_ids"], batch["attention_mask"], t)[0])
        policy.load_adapter(run / "promoted" / "r2")
        expected = completion_logprobs(policy.model, batch["input_ids"], batch["attention_mask"], t)[0]
    assert torch.allclose(ref, expected, atol=1e-6)

    # a restart takes the reference state.json names; the report names the reset
    def restart(config):
        agent = make_agent(load_policy(str(tiny_model_dir), device="cpu"), embedder, run / "store.sqlite")
        return SelfImprovementLoop(agent, run, TASKS, EVAL, UPDATE, config, progress=False)

    assert all(torch.equal(a, b) for a, b in zip(restart(cfg).updater.ref_adapter, r2))
    assert "round 3: KL reference reset to the promoted policy r2" in write_report(run).read_text()
    off = restart(LoopConfig(tasks_per_round=2, eval_k=2, margin=1.0))  # reset turned off: the base again
    assert off.updater.ref_adapter is None and off.state.reference_version == "base"


def read_steps(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def load_policy_adapter(policy, directory):
    """The LoRA weights saved in `directory`, in the order of the policy's trainable parameters."""
    from safetensors.torch import load_file

    saved = load_file(str(directory / "adapter_model.safetensors"))
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    return [saved[n.replace(".default", "")] for n in names]


def test_where_tasks_have_gold_answers_the_round_records_how_often_the_top_answer_is_right(policy, embedder, tmp_path):
    from grpo_agent.evaluation import is_correct

    run = tmp_path / "run"
    tasks = [{**t, "answer": word} for t, word in zip(TASKS, ["the", "a", "of", "the", "is", "to"])]
    agent = make_agent(policy, embedder, run / "store.sqlite")
    loop = SelfImprovementLoop(agent, run, tasks, EVAL, UPDATE, LoopConfig(tasks_per_round=6, eval_k=2), progress=False)
    (row,) = loop.run(1)
    assert row["labelled_groups"] == 6
    top = right = n = 0
    for group in agent.store.groups(source="loop"):
        task = next(t for t in tasks if t["id"] == group.info.task_id)
        ok = [is_correct(c.text, task["answer"]) for c in group.completions]
        best = max(range(len(ok)), key=lambda i: (group.completions[i].composite, -i))
        top, right, n = top + ok[best], right + sum(ok), n + len(ok)
    assert row["top_correct_rate"] == top / 6 and row["sample_correct_rate"] == right / n
    assert 0 < right < n  # the tiny model's answers contain these words sometimes: a real mix to rank
    assert "top-ranked answer right" in write_report(run).read_text()


def test_groups_sampled_more_than_max_staleness_promotions_back_are_consumed_untrained(policy, embedder, tmp_path):
    agent = make_agent(policy, embedder, tmp_path / "run" / "store.sqlite")
    loop = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL, UPDATE,
                               LoopConfig(tasks_per_round=2, eval_k=2, margin=1.0), progress=False)
    (row,) = loop.run(1)
    assert row["promoted"] and row["stale_groups"] == 0
    (sampled,) = agent.store.groups(source="loop")[:1]

    def late(version: str, n: int) -> str:  # a group a slow rollout worker sampled from `version`, logged only now
        group = dataclasses.replace(sampled, group_id=f"late-{version}-{n}", policy_version=version)
        return agent.store.log_group(group, prompt="late", source="loop")

    old = late("base", 1)  # one promotion (r1) back
    (row,) = loop.run(2)  # max_staleness = 0: only what r1 sampled is trained on
    assert row["promoted"] and row["stale_groups"] == 1 and row["groups"] == 2
    assert old in agent.store.updates()[-1].group_ids  # consumed: never offered to a later update
    assert old not in {g.group_id for g in agent.store.groups(unconsumed=True, source="loop")}

    loop.cfg = dataclasses.replace(loop.cfg, max_staleness=1)
    old, recent = late("base", 2), late("r1", 2)  # two promotions back (r1, r2), and one (r2)
    (row,) = loop.run(3)
    assert row["stale_groups"] == 1 and row["groups"] == 3  # the round's 2, and the one from r1
    assert {old, recent} <= set(agent.store.updates()[-1].group_ids)
    with pytest.raises(ValueError, match="max_staleness"):
        LoopConfig(max_staleness=-1)
