"""The remote rollout engine against a real vLLM server process (the CPU build, in .venv-vllm, made by
`make .venv-vllm/.installed`, which `make test` runs), started here on 127.0.0.1 with a tiny model."""

import os

import pytest
import torch

from grpo_agent.rollout.engines import EngineError, RemoteEngine
from grpo_agent.rollout.vllm_server import VLLM_PYTHON, VLLMServer, free_port

CHATS = [[{"role": "user", "content": "Is the snow leopard endangered?"}],
         [{"role": "user", "content": "What harms sea turtle hatchlings on beaches?"}]]

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """A tiny Llama whose head size vLLM's CPU attention takes (64), with the tests' tokenizer."""
    from conftest import build_tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=2, pad_token_id=0)
    path = tmp_path_factory.mktemp("vllm-model")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vllm_server(vllm_model_dir, tmp_path_factory):
    """vLLM's OpenAI server as its own process on 127.0.0.1 (LoRA on, tempered log-probs); stopped after the module."""
    if not VLLM_PYTHON.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{VLLM_PYTHON} is missing: `make test` makes it (make .venv-vllm/.installed)")
        pytest.skip("no vLLM environment: make .venv-vllm/.installed")
    server = VLLMServer(vllm_model_dir, tmp_path_factory.mktemp("vllm"), name="tiny", max_lora_rank=8,
                        max_num_seqs=32)
    try:
        url = server.start()
    except EngineError as e:
        pytest.fail(str(e))
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local(vllm_model_dir):
    from grpo_agent.rollout.policy import load_policy

    return load_policy(str(vllm_model_dir), device="cpu")


def recomputed(policy, group, completion):
    """The tempered log-probs of a completion from one forward pass of the in-process model."""
    ids = torch.tensor([group.prompt_token_ids + completion.token_ids])
    with torch.no_grad():
        logits = policy.model(ids).logits[0, len(group.prompt_token_ids) - 1 : -1].float() / group.temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)


def test_groups_from_vllm_carry_token_ids_and_our_tempered_logprobs(vllm_server, local):
    engine = RemoteEngine(vllm_server, local)
    groups = engine.sample(CHATS, k=4, max_new_tokens=12, temperature=0.7, seed=0)
    assert [len(g.completions) for g in groups] == [4, 4]
    for chat, g in zip(CHATS, groups):
        assert g.prompt_token_ids == local.encode_chat(chat) and g.policy_version == "base"
        for c in g.completions:
            assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in local.stop_token_ids  # the stop token is kept, as in Policy.sample
            assert torch.allclose(torch.tensor(c.logprobs), recomputed(local, g, c), atol=2e-3)
    again = engine.sample(CHATS, k=4, max_new_tokens=12, temperature=0.7, seed=0)
    assert [[c.token_ids for c in g.completions] for g in again] == [[c.token_ids for c in g.completions] for g in groups]
    twice = engine.sample([CHATS[0], CHATS[0]], k=4, max_new_tokens=12, temperature=0.7, seed=0)
    assert [c.token_ids for c in twice[0].completions] != [c.token_ids for c in twice[1].completions]  # own seeds


def lora_adapter(model_dir, path, seed=1):
    """A random LoRA adapter that changes the model (a zero B would be the zero adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(path)
    return path


def test_a_loaded_adapter_changes_the_samples_and_is_recorded(vllm_server, vllm_model_dir, tmp_path):
    from grpo_agent.rollout.policy import load_policy

    local = load_policy(str(vllm_model_dir), device="cpu")
    lora_adapter(vllm_model_dir, tmp_path / "v1")
    engine = RemoteEngine(vllm_server, local)
    before = engine.sample(CHATS, k=4, max_new_tokens=12, temperature=1.0, seed=3)
    engine.load_adapter(tmp_path / "v1", version="r1")
    after = engine.sample(CHATS, k=4, max_new_tokens=12, temperature=1.0, seed=3)
    assert all(g.policy_version == "r1" for g in after)
    assert [[c.token_ids for c in g.completions] for g in after] != [[c.token_ids for c in g.completions] for g in before]
    local.load_adapter(tmp_path / "v1", version="r1")  # the in-process model with the same adapter agrees
    for g in after:
        for c in g.completions:
            assert torch.allclose(torch.tensor(c.logprobs), recomputed(local, g, c), atol=2e-3)


def test_a_server_serving_other_weights_is_refused_with_the_fix(vllm_server, vllm_model_dir, tmp_path):
    from grpo_agent.rollout.policy import load_policy

    other = load_policy(str(vllm_model_dir), device="cpu")
    other.load_adapter(lora_adapter(vllm_model_dir, tmp_path / "other", seed=2))  # in-process differs from served
    with pytest.raises(EngineError, match="logprobs-mode processed_logprobs"):
        RemoteEngine(vllm_server, other)


def test_a_server_that_is_not_there_and_top_p_are_refused_clearly(vllm_server, local):
    with pytest.raises(EngineError, match="cannot reach the inference server"):
        RemoteEngine(f"http://127.0.0.1:{free_port()}", local, timeout=5)
    with pytest.raises(EngineError, match="top_p"):
        RemoteEngine(vllm_server, local).sample(CHATS, k=2, max_new_tokens=4, top_p=0.9)
    with pytest.raises(EngineError, match="not a LoRA adapter"):
        RemoteEngine(vllm_server, local).load_adapter("/nonexistent", version="x")


def test_the_loop_samples_on_vllm_and_serves_it_each_promoted_adapter(vllm_server, vllm_model_dir, embedder,
                                                                        tmp_path):
    from agent_fixtures import EVAL, TASKS, make_agent

    from grpo_agent.config import LoopConfig, UpdateConfig
    from grpo_agent.loop import SelfImprovementLoop
    from grpo_agent.rollout.policy import load_policy

    policy = load_policy(str(vllm_model_dir), device="cpu")
    agent = make_agent(policy, embedder, tmp_path / "run" / "store.sqlite")
    agent.engine = RemoteEngine(vllm_server, policy)
    loop = SelfImprovementLoop(agent, tmp_path / "run", TASKS, EVAL,
                               UpdateConfig(learning_rate=5e-2, groups_per_step=1, lora_r=8),
                               LoopConfig(tasks_per_round=3, eval_k=2, label_free=True, margin=1.0), progress=False)
    before = agent.engine.sample(CHATS, k=4, max_new_tokens=12, seed=5)
    (row,) = loop.run(1)  # margin 1: round 1 promotes whatever its eval
    assert row["promoted"] and agent.engine.version == "r1"
    assert {g.policy_version for g in agent.store.groups(source="loop")} == {"base"}  # collected on vLLM, base
    after = agent.engine.sample(CHATS, k=4, max_new_tokens=12, seed=5)
    assert {g.policy_version for g in after} == {"r1"}
    assert [[c.logprobs for c in g.completions] for g in after] != [[c.logprobs for c in g.completions] for g in before]
    for g in after:  # what vLLM serves now is what the loop trained: the in-process r1 gives the same log-probs
        for c in g.completions:
            assert torch.allclose(torch.tensor(c.logprobs), recomputed(policy, g, c), atol=2e-3)
    loop.run(2)
    round2 = [g for g in agent.store.groups(source="loop") if g.policy_version == "r1"]
    assert len(round2) == 3  # round 2's groups were sampled by the promoted r1 on the server
