"""The same policy and updater on a CUDA GPU (bf16 weights, fp32 LoRA); skipped where torch sees none.

CI has no GPU: run these where one is, with `pytest -m gpu`.
"""

import pytest
import torch

from test_updater import CHATS, token_logprobs

from grpo_agent.config import UpdateConfig
from grpo_agent.rollout.policy import load_policy
from grpo_agent.updater import GRPOUpdater

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_device_is_the_gpu_in_bf16_and_sampled_logprobs_match_a_forward_pass(tiny_model_dir):
    policy = load_policy(str(tiny_model_dir))  # device "auto"
    assert policy.device.type == "cuda" and next(policy.model.parameters()).dtype == torch.bfloat16
    groups = policy.sample(CHATS, k=4, max_new_tokens=12, temperature=1.0, seed=0)
    assert [len(g.completions) for g in groups] == [4] * 4
    again = policy.sample(CHATS, k=4, max_new_tokens=12, temperature=1.0, seed=0)
    assert [c.token_ids for g in again for c in g.completions] == [c.token_ids for g in groups for c in g.completions]
    diffs = torch.cat([token_logprobs(policy, g, i) - torch.tensor(c.logprobs)
                       for g in groups for i, c in enumerate(g.completions)])
    assert diffs.abs().mean() < 0.05  # the KV-cached decode and a full pass agree to bf16 precision


def test_a_gpu_update_raises_the_better_answer_and_its_adapter_serves_on_cpu(tiny_model_dir, tmp_path):
    policy = load_policy(str(tiny_model_dir), device="cuda")
    groups = policy.sample(CHATS, k=4, max_new_tokens=10, temperature=1.0, seed=0)
    for g in groups:
        for i, c in enumerate(g.completions):
            c.advantage = 1.5 if i == 0 else -0.5
    updater = GRPOUpdater(policy, UpdateConfig(learning_rate=2e-3, groups_per_step=2, num_iterations=3), tmp_path)
    lora = [p for p in policy.model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # small updates are not rounded away in bf16
    before = [(token_logprobs(policy, g, 0).sum(), token_logprobs(policy, g, 1).sum()) for g in groups]
    history = updater.train(groups)
    after = [(token_logprobs(policy, g, 0).sum(), token_logprobs(policy, g, 1).sum()) for g in groups]
    assert all(a[0] > b[0] and a[1] < b[1] for a, b in zip(after, before))
    assert all(torch.isfinite(torch.tensor([h["loss"], h["kl"], h["grad_norm"]])).all() for h in history)
    assert 0 < history[-1]["kl"] < 0.5
    saved = updater.save_checkpoint()

    cpu = load_policy(str(tiny_model_dir), device="cpu")
    cpu.load_adapter(saved / "adapter", version="gpu")
    trained = {n: p.detach().cpu() for n, p in policy.model.named_parameters() if "lora_" in n}
    loaded = {n: p.detach() for n, p in cpu.model.named_parameters() if "lora_" in n}
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[n], loaded[n]) for n in trained)

    resumed = GRPOUpdater(load_policy(str(tiny_model_dir), device="cuda"), updater.cfg, tmp_path)
    assert resumed.resume() and resumed.step == updater.step == len(history)
