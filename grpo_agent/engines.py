"""Rollout engines: where groups are sampled (issue #21).

Two engines answer `sample(...)` the same way (`Policy.sample`'s signature: K completions per chat, their token
ids and tempered log-probs, the weights version that wrote them):
  Policy        in-process, on transformers (grpo_agent.policy and grpo_agent.decoding): the default;
  RemoteEngine  an OpenAI-compatible inference server (vLLM; SGLang speaks the same API) that serves the same
                base model with LoRA enabled. Prompts go as token ids (our chat template, our encoding), each
                chat's K samples as one request with `n` = K, sent concurrently so the server batches them. After
                a promotion (or a rollback) the loop loads that adapter directory into it in place.

Log-probs must mean what ours mean: log_softmax(logits / temperature) at the sampled token, before top-p. vLLM
returns that with `--logprobs-mode processed_logprobs` (its default, raw_logprobs, is at temperature 1), and
only with top_p = 1 (with top_p < 1 its processed log-probs are renormalised over the nucleus); RemoteEngine
checks both (`check_logprobs`) rather than train on log-probs of another meaning.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from .errors import GRPOAgentError
from .records import Completion, Group

ADAPTER_NAME = "grpo-policy"  # the LoRA name the promoted adapter is served under (replaced in place)


class EngineError(GRPOAgentError):
    """The inference server could not be reached, refused a request, or answered in a way we cannot use."""


class RemoteEngine:
    """Samples groups on an OpenAI-compatible server; `policy` (the same base model, in-process) encodes the chats
    and keeps the weights the updater trains."""

    def __init__(self, url: str, policy, model: str | None = None, timeout: float = 600.0, concurrency: int = 64):
        self.url, self.policy, self.timeout = url.rstrip("/"), policy, timeout
        self.concurrency = concurrency
        served = [m["id"] for m in self._call("GET", "/v1/models")["data"]]
        if model is not None and model not in served:
            raise EngineError(f"{self.url} serves {served}, not {model!r}: give one of those")
        self.base = model or served[0]
        self.model, self.version = self.base, "base"  # what requests name, and the weights that answers them

    @property
    def name(self) -> str:
        return f"{self.base} at {self.url}"

    def _call(self, method: str, path: str, body: dict | None = None, reply: str = "json") -> dict:
        """One request; its JSON reply (reply="text": the reply's text under "text", as vLLM's adapter loading
        answers in words)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            raise EngineError(f"{method} {self.url}{path} answered {e.code}: {e.read().decode()[:500]}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise EngineError(f"cannot reach the inference server at {self.url} ({e}); is it running? "
                              "See README, 'Rollouts on vLLM'") from e
        if reply == "text":
            return {"text": text}
        try:
            return json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            raise EngineError(f"{method} {self.url}{path} answered something that is not JSON: {text[:200]!r}") from e

    def sample(self, messages_batch, k: int = 8, max_new_tokens: int = 128, temperature: float = 1.0,
               top_p: float = 1.0, seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
               prefix: str = "", tools=None, prompt_ids: Sequence[list[int]] | None = None) -> list[Group]:
        """As Policy.sample, on the server: one request per chat (n = k), all in flight at once."""
        if top_p != 1.0:
            raise EngineError(f"top_p = {top_p}: the server's log-probs are renormalised over the nucleus, so they "
                              "are not the log-probs the updater needs; sample with top_p = 1 on a remote engine")
        policy = self.policy
        start = policy.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
        encoded = prompt_ids if prompt_ids is not None else [policy.encode_chat(m, tools) for m in messages_batch]
        prompts = [list(p) + start for p in encoded]
        stops = policy.stop_token_ids if stop_token_ids is None else list(stop_token_ids)
        bodies = [{"model": self.model, "prompt": p, "n": k, "max_tokens": max_new_tokens,
                   "temperature": temperature, "top_p": 1.0, "logprobs": 0, "return_token_ids": True,
                   "stop_token_ids": stops, "ignore_eos": not stops, "skip_special_tokens": True,
                   **({"seed": seed * 1_000_003 + b} if seed is not None else {})} for b, p in enumerate(prompts)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(bodies)))) as pool:
            answers = list(pool.map(lambda body: self._call("POST", "/v1/completions", body), bodies))
        version = self.version
        groups = []
        for messages, prompt, answer in zip(messages_batch, prompts, answers):
            completions = [self._completion(c, stops) for c in sorted(answer["choices"], key=lambda c: c["index"])]
            groups.append(Group(messages=[dict(m) for m in messages], prompt_token_ids=prompt,
                                completions=completions, policy_version=version, temperature=temperature))
        return groups

    def _completion(self, choice: dict, stops: Sequence[int]) -> Completion:
        ids = choice.get("token_ids")
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if ids is None or logprobs is None or len(ids) != len(logprobs):
            raise EngineError("the server's completion lacks token ids or log-probs per token (vLLM: it needs "
                              "`return_token_ids` and `logprobs`); start vLLM >= 0.10 as README, 'Rollouts on vLLM'")
        if any(lp is None for lp in logprobs):
            raise EngineError("the server returned a token without a log-prob")
        stopped = choice.get("finish_reason") == "stop"
        return Completion(text=choice.get("text", "").strip(), token_ids=list(ids), logprobs=[float(x) for x in logprobs],
                          finish_reason="stop" if stopped else "length")

    def load_adapter(self, directory: str | os.PathLike, version: str) -> None:
        """Serve the LoRA adapter in `directory` (peft's format) in place of the one served now; later groups
        record `version`."""
        path = Path(directory).resolve()
        if not (path / "adapter_config.json").is_file():
            raise EngineError(f"{path} is not a LoRA adapter directory (adapter_config.json, "
                              "adapter_model.safetensors)")
        self._call("POST", "/v1/load_lora_adapter", {"lora_name": ADAPTER_NAME, "lora_path": str(path),
                                                      "load_inplace": True}, reply="text")
        self.model, self.version = ADAPTER_NAME, version

    def completion(self, prompt_ids, text: str, temperature: float = 1.0) -> Completion:
        """A candidate the sampler did not write, scored by the in-process policy (the weights being trained)."""
        return self.policy.completion(prompt_ids, text, temperature)
