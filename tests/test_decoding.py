import pytest
import torch

from grpo_agent.rollout import decoding
from grpo_agent.rollout.decoding import decode, prefill, shares_prefix, shared_prefix_attention

PROMPTS = [[1, 5, 9, 13, 2], [1, 7, 3], [1, 4, 4, 8, 15, 16, 23, 42, 11]]  # different lengths: left padding


def run(policy, prompts, k, seed, max_new_tokens=12, temperature=1.0, top_p=1.0):
    gen = torch.Generator().manual_seed(seed)
    stops = torch.tensor(policy.stop_token_ids)
    return decode(policy.model, prompts, k, max_new_tokens, temperature, top_p, gen, stops, policy.pad_token_id)


def test_the_tiny_llama_decodes_with_a_shared_prefix(tiny_policy):
    assert shares_prefix(tiny_policy.model)


def test_shared_prefix_samples_what_the_repeated_cache_samples(tiny_policy, monkeypatch):
    shared = run(tiny_policy, PROMPTS, k=4, seed=3)
    monkeypatch.setattr(decoding, "shares_prefix", lambda model: False)
    plain = run(tiny_policy, PROMPTS, k=4, seed=3)
    assert shared.lengths == plain.lengths and shared.stopped == plain.stopped
    assert torch.equal(shared.tokens, plain.tokens)
    assert torch.allclose(shared.logprobs, plain.logprobs, atol=1e-5)


def test_logprobs_equal_a_forward_pass_over_each_whole_sequence(tiny_policy):
    out = run(tiny_policy, PROMPTS, k=3, seed=5, temperature=0.8)
    for r in range(len(PROMPTS) * 3):
        prompt, ids = PROMPTS[r // 3], out.tokens[r, : out.lengths[r]].tolist()
        with torch.no_grad():
            logits = tiny_policy.model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
        want = torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
        assert torch.allclose(out.logprobs[r, : len(ids)], want, atol=1e-4)


def test_rows_that_stop_leave_the_batch_and_the_rest_go_on(tiny_policy):
    # every token but a few is a stop token, so rows stop at different steps
    stops = torch.arange(tiny_policy.model.config.vocab_size)[::3]
    gen = torch.Generator().manual_seed(0)
    out = decode(tiny_policy.model, PROMPTS, 5, 10, 1.0, 1.0, gen, stops, tiny_policy.pad_token_id)
    assert len(set(out.lengths)) > 1 and any(out.stopped) and max(out.lengths) > 1
    for r, n in enumerate(out.lengths):
        assert out.stopped[r] == (out.tokens[r, n - 1].item() in set(stops.tolist()))
        assert not any(t in set(stops.tolist()) for t in out.tokens[r, : n - 1].tolist())


def test_prefill_keeps_one_copy_of_each_prompt_in_chunks(tiny_policy, monkeypatch):
    monkeypatch.setattr(decoding, "PREFILL_TOKENS", 10)  # one prompt per chunk
    state, logits = prefill(tiny_policy.model, PROMPTS, tiny_policy.pad_token_id, torch.device("cpu"))
    monkeypatch.setattr(decoding, "PREFILL_TOKENS", 10_000)  # all at once
    whole, whole_logits = prefill(tiny_policy.model, PROMPTS, tiny_policy.pad_token_id, torch.device("cpu"))
    L = max(map(len, PROMPTS))
    assert state.keys[0].shape[0] == len(PROMPTS) and state.keys[0].shape[2] == L  # B prompts, not B*K rows
    assert torch.equal(state.bias.isfinite(), whole.bias.isfinite())
    assert [int(b.isfinite().sum()) for b in state.bias] == [len(p) for p in PROMPTS]
    assert torch.allclose(logits, whole_logits, atol=1e-5)
    real = whole.bias[:, 0, 0].isfinite()
    for a, b in zip(state.keys, whole.keys):
        assert torch.allclose(a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=1e-5)


def test_a_forward_without_a_shared_prefix_still_gets_plain_attention(tiny_policy):
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        want = tiny_policy.model(ids).logits
        with shared_prefix_attention(tiny_policy.model):
            got = tiny_policy.model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert tiny_policy.model.config._attn_implementation != decoding.ATTENTION  # restored


def test_models_it_cannot_serve_decode_the_plain_way(tiny_policy, monkeypatch):
    config = tiny_policy.model.config
    monkeypatch.setattr(config, "sliding_window", 4, raising=False)
    assert not shares_prefix(tiny_policy.model)
    out = run(tiny_policy, PROMPTS, k=2, seed=1, max_new_tokens=4)
    assert len(out.lengths) == 6


def test_two_models_decoding_at_once_each_get_and_give_back_their_setting(tiny_model_dir):
    from grpo_agent.rollout.policy import load_policy

    a, b = load_policy(str(tiny_model_dir), device="cpu").model, load_policy(str(tiny_model_dir), device="cpu").model
    before = a.config._attn_implementation
    first, second = shared_prefix_attention(a), shared_prefix_attention(b)
    first.__enter__()
    second.__enter__()
    assert a.config._attn_implementation == b.config._attn_implementation == decoding.ATTENTION
    first.__exit__(None, None, None)  # out of order: a finishes first
    assert a.config._attn_implementation == before and b.config._attn_implementation == decoding.ATTENTION
    second.__exit__(None, None, None)
    assert b.config._attn_implementation == before
