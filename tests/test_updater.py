import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_agent.config import UpdateConfig
from grpo_agent.grpo import completion_logprobs
from grpo_agent.rollout.policy import load_policy
from grpo_agent.updater import GRPOUpdater, Row, UpdateError, latest_checkpoint, pack, trainable_rows

CHATS = [[{"role": "user", "content": q}] for q in
         ["Is the tiger endangered?", "What harms sea turtles?", "Why protect pangolins?", "Where do kakapo live?"]]


@pytest.fixture
def policy(tiny_model_dir):
    return load_policy(str(tiny_model_dir), device="cpu")  # fresh: the updater wraps its model


def scored_groups(policy, k=4, seed=0, best=0):
    """Sampled groups with hand-set advantages: completion `best` is clearly better than the rest."""
    groups = policy.sample(CHATS, k=k, max_new_tokens=10, temperature=1.0, seed=seed)
    for g in groups:
        for i, c in enumerate(g.completions):
            c.advantage = 1.5 if i == best else -0.5
    return groups


def token_logprobs(policy, group, i):
    """Completion i's per-token log-probs recomputed by a full forward pass on the policy's device (fp32, CPU)."""
    c = group.completions[i]
    ids = torch.tensor([group.prompt_token_ids + c.token_ids], device=policy.device)
    with torch.no_grad():
        logp, _ = completion_logprobs(policy.model, ids, torch.ones_like(ids), len(c.token_ids))
    return logp[0].float().cpu()


def sequence_logprob(policy, group, i):
    return float(token_logprobs(policy, group, i).sum())


def lora_state(policy):
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}


def test_training_raises_the_better_answers_and_keeps_kl_small(policy, tmp_path):
    groups = scored_groups(policy)
    cfg = UpdateConfig(learning_rate=2e-3, groups_per_step=2, num_iterations=3, beta=0.04)
    updater = GRPOUpdater(policy, cfg, tmp_path)
    before = [(sequence_logprob(policy, g, 0), sequence_logprob(policy, g, 1)) for g in groups]
    history = updater.train(groups)
    after = [(sequence_logprob(policy, g, 0), sequence_logprob(policy, g, 1)) for g in groups]
    assert len(history) == 6  # 2 steps a pass, 3 passes
    assert all(a[0] > b[0] for a, b in zip(after, before))  # the better answer became more likely
    assert all(a[1] < b[1] for a, b in zip(after, before))  # a worse one less likely
    assert 0 < history[-1]["kl"] < 0.5 and history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert history[0]["clip_fraction"] == 0.0 and history[-1]["clip_fraction"] > 0.0  # later passes: off-policy
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and '"grad_norm"' in lines[0] and '"tokens_per_s"' in lines[0]


def test_zero_variance_groups_are_skipped(policy):
    groups = scored_groups(policy)
    for g in groups[1:]:
        g.zero_variance = True
        for c in g.completions:
            c.advantage = 0.0
    updater = GRPOUpdater(policy, UpdateConfig(groups_per_step=4))
    history = updater.train(groups)
    assert len(history) == 1 and history[0]["groups"] == 1 and history[0]["skipped_groups"] == 3
    assert updater.train(groups[1:]) == []  # nothing trainable: no step at all


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batching_does_not_change_the_update(tiny_model_dir, loss_type):
    results = []
    for budget in (10_000, 40):  # one micro-batch, or many
        policy = load_policy(str(tiny_model_dir), device="cpu")
        groups = scored_groups(policy, k=3)[:2]
        updater = GRPOUpdater(policy, UpdateConfig(loss_type=loss_type, micro_batch_tokens=budget, learning_rate=1e-3))
        (metrics,) = updater.train(groups, max_steps=1)
        results.append((lora_state(policy), metrics["loss"]))
    (a, loss_a), (b, loss_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


@pytest.mark.parametrize("budget", [10_000, 60])
@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_a_shared_prefix_and_chunked_logits_give_the_same_update(tiny_model_dir, loss_type, lora, budget):
    """Each prompt run once for its completions and the logits made 7 tokens at a time: the same loss and gradients
    as full rows with whole logits (issue #23), for every loss type, LoRA and full, micro-batched or not, with the
    KL to the reference, an episode's mask, and old log-probs off the current policy (ratios clipped)."""
    results = []
    for share, chunk in ((False, 0), (True, 7)):
        policy = load_policy(str(tiny_model_dir), device="cpu")
        groups = scored_groups(policy, k=3, seed=3)[:3]
        noise = torch.Generator().manual_seed(0)
        for c in (c for g in groups for c in g.completions):
            c.logprobs = (torch.tensor(c.logprobs) + 0.3 * torch.randn(len(c.logprobs), generator=noise)).tolist()
        for c in groups[1].completions:  # an episode: only every other token sampled by the policy
            c.mask = [1 - i % 2 for i in range(len(c.token_ids))]
        updater = GRPOUpdater(policy, UpdateConfig(loss_type=loss_type, lora=lora, micro_batch_tokens=budget,
                                                   share_prefix=share, logit_chunk_tokens=chunk, beta=0.04))
        assert updater.share_prefix is share
        (loss, kl, clip, _) = updater.gradients([r for rows in trainable_rows(groups)[0] for r in rows])
        results.append((loss, kl, clip, {n: p.grad.clone() for n, p in policy.model.named_parameters()
                                         if p.grad is not None}))
    (loss_a, kl_a, clip_a, a), (loss_b, kl_b, clip_b, b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-5) and kl_a == pytest.approx(kl_b, abs=1e-5)
    assert clip_a == pytest.approx(clip_b, abs=1e-4)
    assert a.keys() == b.keys() and len(a) > 0 and clip_a > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), name


def test_pack_counts_a_shared_prompt_once():
    rows = [Row([1] * 20, [2] * 4, [0.0] * 4, 1.0, 1.0, "g") for _ in range(4)]
    rows += [Row([3] * 10, [2] * 6, [0.0] * 6, 1.0, 1.0, "h") for _ in range(2)]
    assert [len(b) for b in pack(rows, budget=40)] == [1, 1, 1, 1, 2]  # 24 tokens a row
    assert [len(b) for b in pack(rows, budget=40, shared=True)] == [4, 2]  # 20 + 4 x 4, then 10 + 2 x 6
    assert [len(b) for b in pack(rows, budget=60, shared=True)] == [4, 2]  # 2 prompts x 20 + 5 x 6 = 70 > 60


def test_pack_respects_the_token_budget():
    rows = [Row([1] * 5, [2] * n, [0.0] * n, 1.0, 1.0, "g") for n in (3, 4, 10, 2, 2)]
    batches = pack(rows, budget=30)
    assert [len(b) for b in batches] == [2, 2, 1]
    for b in batches:
        assert len(b) == 1 or len(b) * (5 + max(len(r.completion) for r in b)) <= 30


def test_a_non_finite_step_is_skipped_and_weights_are_untouched(policy):
    groups = scored_groups(policy)
    groups[0].completions[0].advantage = float("nan")
    updater = GRPOUpdater(policy, UpdateConfig(groups_per_step=4, learning_rate=1e-3))
    before = lora_state(policy)
    (metrics,) = updater.train(groups)
    assert metrics["skipped_nonfinite"] and not math.isfinite(metrics["loss"])
    after = lora_state(policy)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_bad_groups_are_clear_errors(policy):
    groups = scored_groups(policy)
    groups[0].completions[1].advantage = None
    with pytest.raises(UpdateError, match="has no advantage: score the group first"):
        GRPOUpdater(policy).train(groups)
    groups = scored_groups(policy)
    groups[0].completions[1].logprobs.pop()
    with pytest.raises(UpdateError, match="log-probs; train only on what the sampler produced"):
        GRPOUpdater(policy).train(groups)


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    cfg = UpdateConfig(groups_per_step=1, num_iterations=2, learning_rate=1e-3)
    policy = load_policy(str(tiny_model_dir), device="cpu")
    groups = scored_groups(policy)
    full = GRPOUpdater(policy, cfg)
    history = full.train(groups)
    expected = lora_state(policy)

    first = load_policy(str(tiny_model_dir), device="cpu")
    part = GRPOUpdater(first, cfg, tmp_path)
    part.train(groups, max_steps=3)
    saved = part.save_checkpoint()
    assert saved.name == "checkpoint-000003" and (saved / "adapter" / "adapter_model.safetensors").is_file()

    second = load_policy(str(tiny_model_dir), device="cpu")  # a new process, as after a kill
    resumed = GRPOUpdater(second, cfg, tmp_path)
    assert resumed.resume() and resumed.step == 3 and len(resumed.consumed) == 3
    rest = resumed.train(groups)
    assert [m["loss"] for m in rest] == pytest.approx([m["loss"] for m in history[3:]], abs=1e-6)
    got = lora_state(second)
    assert all(torch.allclose(got[n], expected[n], atol=1e-6) for n in expected)


def test_incomplete_checkpoints_are_ignored(policy, tmp_path):
    updater = GRPOUpdater(policy, UpdateConfig(groups_per_step=2), tmp_path)
    updater.train(scored_groups(policy), max_steps=1)
    good = updater.save_checkpoint()
    (tmp_path / ".checkpoint-000009.tmp-123").mkdir()  # a kill mid-write leaves this
    (tmp_path / "checkpoint-000010").mkdir()  # and a directory without state.json is not complete
    assert latest_checkpoint(tmp_path) == good
    assert not list(tmp_path.glob("*/*.pt")) and not list(tmp_path.glob("*/*.bin"))  # safetensors only
    (good / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(UpdateError, match="could not be loaded"):
        GRPOUpdater(load_policy(str(policy.name), device="cpu"), UpdateConfig(groups_per_step=2), tmp_path).resume()


def test_full_fine_tuning_with_a_frozen_reference(policy, tmp_path):
    cfg = UpdateConfig(lora=False, learning_rate=1e-3, beta=0.1, groups_per_step=4)
    updater = GRPOUpdater(policy, cfg, tmp_path)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    (metrics,) = updater.train(scored_groups(policy))
    assert math.isfinite(metrics["loss"])
    assert any(not torch.equal(before[n], p) for n, p in policy.model.named_parameters())
    assert all(torch.equal(before[n], p) for n, p in updater.ref_model.named_parameters())
    assert (updater.save_checkpoint() / "model.safetensors").is_file()


DDP_SCRIPT = Path(__file__).with_name("ddp_train.py")


def test_two_processes_under_torchrun_equal_one(tiny_model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(DDP_SCRIPT), str(tiny_model_dir), str(out)]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        from safetensors.torch import load_file

        outs[n] = load_file(str(latest_checkpoint(out) / "adapter" / "adapter_model.safetensors"))
    assert outs[1].keys() == outs[2].keys()
    for name in outs[1]:
        assert torch.allclose(outs[1][name], outs[2][name], atol=1e-5), name


@pytest.mark.bundled
def test_a_short_run_on_the_bundled_model(bundled_policy, tmp_path):
    policy = load_policy("default", device="cpu")
    chats = [[{"role": "user", "content": q}] for q in
             ["Is it a good idea to keep a slow loris as a pet?", "What threatens sea turtle hatchlings?"]]
    groups = policy.sample(chats, k=4, max_new_tokens=24, temperature=1.0, seed=0)
    for g in groups:  # hand-made: the first answer of each group is the better one
        for i, c in enumerate(g.completions):
            c.advantage = 1.5 if i == 0 else -0.5
    before = [sequence_logprob(policy, g, 0) for g in groups]
    updater = GRPOUpdater(policy, UpdateConfig(learning_rate=1e-4, groups_per_step=2, num_iterations=3), tmp_path)
    history = updater.train(groups)
    after = [sequence_logprob(policy, g, 0) for g in groups]
    assert all(a > b for a, b in zip(after, before))
    assert history[-1]["kl"] < 0.1


def test_the_loops_update_on_two_processes_under_torchrun_equals_one(tiny_model_dir, embedder, tmp_path):
    from agent_fixtures import EVAL, FACTS, TASKS

    from grpo_agent.agent import GRPOAgent
    from grpo_agent.config import Config, LoopConfig, PolicyConfig, RetrievalConfig, SamplingConfig
    from grpo_agent.loop import SelfImprovementLoop
    from grpo_agent.retrieval import FactIndex

    FactIndex.build(FACTS, embedder).save(tmp_path / "facts")
    adapters, rows = {}, {}
    for n in (1, 2):
        cfg = Config(policy=PolicyConfig(model=str(tiny_model_dir), device="cpu"),
                     sampling=SamplingConfig(k=4, max_new_tokens=12, seed=7),
                     retrieval=RetrievalConfig(index=str(tmp_path / "facts"), top_k=2),
                     update=UpdateConfig(learning_rate=5e-2, lora_r=8, groups_per_step=2, processes=n))
        run = tmp_path / f"run{n}"
        agent = GRPOAgent.from_config(cfg, store_path=run / "store.sqlite", embedder=embedder)
        loop = SelfImprovementLoop(agent, run, TASKS, EVAL, cfg.update,
                                   LoopConfig(tasks_per_round=4, eval_k=2, eval_size=2, margin=1.0), batch=2,
                                   progress=False)
        (rows[n],) = loop.run(1)
        adapters[n] = {k: p.detach().clone() for k, p in agent.policy.model.named_parameters() if "lora_B" in k}
        assert loop.updater.step == 2 and rows[n]["steps"] == 2  # 4 groups, 2 a step: what this process now holds
    assert (tmp_path / "run2" / "update_job.json").is_file() and not (tmp_path / "run1" / "update_job.json").exists()
    assert any(w.abs().sum() > 0 for w in adapters[2].values())  # the processes trained, and the loop has it
    for name, w in adapters[1].items():  # equal up to the order of the gradient sums (Adam's first steps
        assert (w - adapters[2][name]).abs().max() <= 1e-2 * w.abs().max(), name  # magnify that a little)
    assert rows[1]["eval"]["value"] == pytest.approx(rows[2]["eval"]["value"], abs=1e-3)
