"""The GRPO loss against TRL's GRPOTrainer._compute_loss on the same inputs, and the formulas by hand."""

import math

import pytest
import torch

from grpo_agent.grpo import (completion_logprobs, grpo_loss, importance_ratio, kl_k3, reduce_loss,
                             shared_prefix_logprobs)
from grpo_agent.updater import Row, collate

B, P, T = 4, 5, 6  # completions, prompt length (no left padding: TRL passes no position ids), completion length


@pytest.fixture(scope="module")
def trl_trainer(tiny_model_dir, tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoTokenizer

    args = trl.GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=B, num_generations=B,
        max_completion_length=T, beta=0.04, report_to="none", use_cpu=True, bf16=False, epsilon=0.2, epsilon_high=0.28,
    )
    trainer = trl.GRPOTrainer(
        model=str(tiny_model_dir), reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": ["hello"] * B}),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call _compute_loss directly
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0  # a completion that stopped early (right padding)
    completion_mask[3, 2:] = 0
    return dict(
        prompt_ids=torch.randint(3, 300, (B // 2, P), generator=g).repeat_interleave(2, 0),  # groups of 2
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=torch.randint(3, 300, (B, T), generator=g),
        completion_mask=completion_mask,
        advantages=torch.tensor([1.2, -0.4, 0.3, -1.1]),
        old_per_token_logps=None,  # filled per test from the model, plus noise, so ratios leave the clip range
        ref_per_token_logps=None,
        num_items_in_batch=completion_mask.sum(),
    )


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "loss_type,level", [("grpo", "token"), ("bnpo", "token"), ("dr_grpo", "token"), ("dapo", "token"),
                        ("grpo", "sequence")]
)
@pytest.mark.parametrize("beta,bias_correction", [(0.0, True), (0.04, True), (0.04, False)])
@pytest.mark.parametrize("shared", [False, True])
def test_loss_and_gradients_equal_trl(trl_trainer, batch, loss_type, level, beta, bias_correction, shared):
    """Ours against TRL's loss and gradients, with full rows or each prompt run once for its group (shared)."""
    model = trl_trainer.model
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        current, _ = completion_logprobs(model, input_ids, attention_mask, T)
    g = torch.Generator().manual_seed(1)
    inputs = dict(batch, old_per_token_logps=current + 0.3 * torch.randn(B, T, generator=g),
                  ref_per_token_logps=current + 0.2 * torch.randn(B, T, generator=g))
    trl_trainer.loss_type, trl_trainer.beta, trl_trainer.importance_sampling_level = loss_type, beta, level
    trl_trainer.args.use_bias_correction_kl = bias_correction

    model.zero_grad()
    theirs = trl_trainer._compute_loss(model, inputs)
    theirs.backward()
    their_grads = grads(model)

    model.zero_grad()
    if shared:
        owner = torch.arange(B) // 2
        logp, _ = shared_prefix_logprobs(model, batch["prompt_ids"][::2], batch["prompt_mask"][::2], owner,
                                         batch["completion_ids"], batch["completion_mask"], chunk=5)
    else:
        logp, _ = completion_logprobs(model, input_ids, attention_mask, T)
    ours = grpo_loss(
        logp, inputs["old_per_token_logps"], inputs["advantages"], inputs["completion_mask"],
        ref_logp=inputs["ref_per_token_logps"], beta=beta, epsilon_low=0.2, epsilon_high=0.28,
        loss_type=loss_type, importance_sampling_level=level, max_completion_length=T,
        num_items=float(inputs["num_items_in_batch"]), use_bias_correction_kl=bias_correction,
    )
    ours.loss.backward()
    our_grads = grads(model)

    assert ours.loss.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 0
    for name in our_grads:
        assert torch.allclose(our_grads[name], their_grads[name], atol=1e-5, rtol=0), name
    assert 0.0 < ours.clip_fraction < 1.0  # the noise put some ratios outside the clip range


def test_completion_logprobs_match_the_sampler(tiny_policy):
    groups = tiny_policy.sample([[{"role": "user", "content": "Hi?"}], [{"role": "user", "content": "A longer one?"}]],
                                k=2, max_new_tokens=8, temperature=0.9, seed=0)
    rows = [Row(prompt=g.prompt_token_ids, completion=c.token_ids, old_logp=c.logprobs, advantage=0.0,
                temperature=0.9, group_id=g.group_id) for g in groups for c in g.completions]
    batch = collate(rows, tiny_policy.pad_token_id, torch.device("cpu"))  # as the updater batches them
    Tc = batch["mask"].shape[1]
    with torch.no_grad():
        logp, entropy = completion_logprobs(tiny_policy.model, batch["input_ids"], batch["attention_mask"], Tc,
                                            temperature=0.9, with_entropy=True)
    for i, c in enumerate(c for g in groups for c in g.completions):
        assert torch.allclose(logp[i, : len(c.token_ids)], torch.tensor(c.logprobs), atol=1e-4)
    assert (entropy >= 0).all() and entropy.shape == logp.shape


def test_formulas_by_hand():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    old = torch.tensor([[-1.5, -2.0], [-0.5, -2.0]])
    ref = torch.tensor([[-1.0, -1.0], [-1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    d = 1.0  # ref - logp at [0, 1]
    assert kl_k3(logp, ref)[0, 1].item() == pytest.approx(math.exp(d) - d - 1)
    assert (kl_k3(logp, ref) >= 0).all() and kl_k3(logp, logp).abs().max() == 0
    r = importance_ratio(logp, old, mask, "token")
    assert r[0, 0].item() == pytest.approx(math.exp(0.5))
    seq = importance_ratio(logp, old, mask, "sequence")
    assert seq.shape == (2, 1) and seq[0, 0].item() == pytest.approx(math.exp(0.25))
    assert seq[1, 0].item() == pytest.approx(1.0)  # the masked token does not count
    # clipping: ratio e^0.5 = 1.65 with A > 0 is clipped at 1.2; the others are at 1
    parts = grpo_loss(logp, old, torch.tensor([1.0, 1.0]), mask, epsilon_low=0.2, epsilon_high=0.2)
    expected = ((-1.2 - 1.0) / 2 + (-1.0) / 1) / 2
    assert parts.loss.item() == pytest.approx(expected) and parts.clip_fraction == pytest.approx(1 / 3)
    per_token = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert reduce_loss(per_token, mask, "bnpo").item() == pytest.approx(6 / 3)
    assert reduce_loss(per_token, mask, "dr_grpo", max_completion_length=4).item() == pytest.approx(6 / 8)
    assert reduce_loss(per_token, mask, "dapo", num_items=12).item() == pytest.approx(6 / 12)
    with pytest.raises(ValueError, match="loss_type = 'ppo'"):
        reduce_loss(per_token, mask, "ppo")
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, old, torch.tensor([1.0, 1.0]), mask, beta=0.1)


def test_a_model_whose_logits_are_not_its_head_of_the_hidden_states_gets_its_own_logits(tiny_model_dir):
    """Scaled (or soft-capped) logits: the chunked path would be wrong, so the log-probs come from the model's own
    logits, and the shared-prefix path says it cannot serve (the updater then runs full rows)."""
    from transformers import AutoModelForCausalLM

    from grpo_agent import grpo

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.register_forward_hook(lambda m, args, out: out.__setitem__("logits", out.logits * 0.5) or out)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, ids, mask, 4)
        want = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, -5:-1].float(), -1)
        assert grpo._HEAD_GIVES_LOGITS[model] is False
        assert shared_prefix_logprobs(model, ids[:1, :5], mask[:1, :5], torch.tensor([0, 0]), ids[:, 5:],
                                      mask[:, 5:]) is None
    assert torch.allclose(logp, want.gather(-1, ids[:, -4:].unsqueeze(-1)).squeeze(-1), atol=1e-6)
