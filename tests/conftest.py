"""Tiny models for fast tests: a byte-level BPE tokenizer trained in memory and a 2-layer Llama from a config.

Nothing here downloads anything; every fixture is built from scratch in milliseconds.
"""

from __future__ import annotations

import pytest
import torch

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The snow leopard is listed as Vulnerable by the IUCN; poaching and habitat loss threaten it.",
    "Sea turtles nest on sandy beaches; lights and plastic harm hatchlings.",
    "Tigers, elephants and rhinos are poached for skins, ivory and horn.",
    "Protected areas, anti-poaching patrols and community programmes help wildlife recover.",
    "What is the conservation status of the giant panda? It is Vulnerable, after decades as Endangered.",
]


def build_tiny_tokenizer():
    """A ChatML tokenizer with a ~300-token byte-level BPE vocabulary, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def build_tiny_model(vocab_size: int, seed: int = 0):
    """A randomly initialised 2-layer Llama (hidden 64) that runs in milliseconds on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A local Hugging Face model directory holding the tiny model and tokenizer."""
    tokenizer = build_tiny_tokenizer()
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2  # the model's eos_token_id above
    model = build_tiny_model(len(tokenizer))
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    from grpo_agent.rollout.policy import load_policy

    return load_policy(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def bundled_policy():
    """The real bundled SmolLM2-135M-Instruct (converted once into the user's grpo-agent cache)."""
    from grpo_agent.rollout.policy import load_policy

    return load_policy("default", device="cpu")


@pytest.fixture(scope="session")
def embedder():
    """The bundled all-MiniLM-L6-v2 (22M parameters, loads in about a second)."""
    from grpo_agent.retrieval import Embedder

    return Embedder()
