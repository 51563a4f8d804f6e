"""Rollout engines: where groups are sampled (issue #21).

Two engines answer `sample(...)` the same way (`Policy.sample`'s signature: K completions per chat, their token
ids and tempered log-probs, the weights version that wrote them):
  Policy        in-process, on transformers (grpo_agent.rollout.policy and grpo_agent.rollout.decoding): the default;
  RemoteEngine  an OpenAI-compatible inference server (vLLM 0.32, tested) that serves the same base model with
                LoRA enabled. Prompts go as token ids (our chat template, our encoding), each chat's K samples
                as one request with `n` = K, sent concurrently so the server batches them, with every other
                sampling knob set to neutral (no top-k, min-p or penalties, whatever the model's
                generation_config says). After each promotion the loop has it serve that adapter.

Log-probs must mean what ours mean: log_softmax(logits / temperature) at the sampled token, before top-p. vLLM
returns that with `--logprobs-mode processed_logprobs` (its default, raw_logprobs, is at temperature 1), and
only with top_p = 1 (with top_p < 1 its processed log-probs are renormalised over the nucleus). RemoteEngine
refuses top_p < 1 and, when it connects, compares the server's log-probs for a short sample with the
in-process model's (`check_logprobs`) rather than train on log-probs of another meaning or another model.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError, EngineError
from ..records import Completion, Group

LOGPROB_TOLERANCE = 0.05  # the largest |server - in-process| log-prob check_logprobs accepts (fp32 both: ~1e-4)
NEUTRAL = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


class RemoteEngine:
    """Samples groups on an OpenAI-compatible server; `policy` (the same base model, in-process) encodes the chats
    and keeps the weights the updater trains."""

    def __init__(self, url: str, policy, model: str | None = None, timeout: float = 600.0, concurrency: int = 64,
                 check: bool = True):
        self.url, self.policy, self.timeout = url.rstrip("/"), policy, timeout
        self.concurrency = concurrency
        served = self._call("GET", "/v1/models")["data"]
        names = [m["id"] for m in served]
        if model is not None and model not in names:
            raise EngineError(f"{self.url} serves {names}, not {model!r}: give one of those")
        self.base = model or names[0]
        limit = next((m.get("max_model_len") for m in served if m["id"] == self.base), None)
        self.context_length = min(x for x in (limit, policy.context_length) if x) if limit or policy.context_length \
            else None  # the server's --max-model-len can be below the model's own window
        self.model, self.version = self.base, "base"  # what requests name, and the weights that answer them
        if check:
            self.check_logprobs()

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
            hint = (" (the server no longer has our adapter: was it restarted? Restart the loop, which loads the "
                    "promoted adapter again)" if e.code == 404 and self.model != getattr(self, "base", None) else "")
            raise EngineError(f"{method} {self.url}{path} answered {e.code}: {e.read().decode()[:500]}{hint}") from e
        except TimeoutError as e:
            raise EngineError(f"{method} {self.url}{path}: no answer in {self.timeout:.0f} s; give the engine a longer "
                              "timeout or send smaller batches") from e
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
            raise EngineError(f"cannot reach the inference server at {self.url} ({e!r}); is it running? "
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
        if k < 1 or max_new_tokens < 1:
            raise ValueError(f"k = {k} and max_new_tokens = {max_new_tokens} must both be >= 1")
        prompts = self.policy.prompts(messages_batch, prefix, tools, prompt_ids)
        stops = self.policy.stop_token_ids if stop_token_ids is None else list(stop_token_ids)
        model, version = self.model, self.version  # the weights these groups come from, even if swapped meanwhile
        # vLLM seeds a request's n samples seed, seed + 1, ...: each chat gets its own k seeds
        bodies = [{"model": model, "prompt": p, "n": k, "max_tokens": max_new_tokens, "temperature": temperature,
                   "top_p": 1.0, **NEUTRAL, "logprobs": 0, "return_token_ids": True, "stop_token_ids": stops,
                   "ignore_eos": True, "skip_special_tokens": True,
                   **({"seed": (seed * 1_000_003 + b * k) % 2**62} if seed is not None else {})}
                  for b, p in enumerate(prompts)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(bodies)))) as pool:
            answers = list(pool.map(lambda body: self._call("POST", "/v1/completions", body), bodies))
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
                              "`return_token_ids` and `logprobs`); start vLLM (0.32 is tested) as README, 'Rollouts on vLLM' says")
        if any(lp is None for lp in logprobs):
            raise EngineError("the server returned a token without a log-prob")
        if choice.get("finish_reason") not in ("stop", "length"):
            raise EngineError(f"the server ended a sample with finish_reason {choice.get('finish_reason')!r} (aborted?)")
        stopped = choice.get("finish_reason") == "stop"
        return Completion(text=choice.get("text", "").strip(), token_ids=list(ids), logprobs=[float(x) for x in logprobs],
                          finish_reason="stop" if stopped else "length")

    def check_logprobs(self, chat: Sequence[dict] = ({"role": "user", "content": "Name one endangered animal."},)
                       ) -> float:
        """Sample a short group on the server and recompute its log-probs in-process (the two must hold the
        same weights); raise EngineError when they differ by more than LOGPROB_TOLERANCE. Returns the largest
        difference."""
        import torch

        from ..grpo import completion_logprobs

        (group,) = self.sample([list(chat)], k=2, max_new_tokens=8, temperature=0.7, seed=0)
        worst = 0.0
        for c in group.completions:
            ids = torch.tensor([group.prompt_token_ids + c.token_ids], device=self.policy.device)
            with torch.inference_mode():
                logp, _ = completion_logprobs(self.policy.model, ids, torch.ones_like(ids), len(c.token_ids), 0.7)
            worst = max(worst, (logp[0].float().cpu() - torch.tensor(c.logprobs)).abs().max().item())
        if worst > LOGPROB_TOLERANCE:
            raise EngineError(f"{self.name}'s log-probs differ from the in-process model's by up to {worst:.3f}: start "
                              "vLLM with --logprobs-mode processed_logprobs (its default is temperature 1), and serve "
                              f"the model grpo-agent loads ({self.policy.name})")
        return worst

    def load_adapter(self, directory: str | os.PathLike, version: str) -> None:
        """Serve the LoRA adapter in `directory` (peft's format, readable by the server) instead of the one
        served now, under a name of its own (this run directory and version), and unload the one it replaces;
        later groups record `version`."""
        path = Path(directory).resolve()
        if not (path / "adapter_config.json").is_file():
            raise EngineError(f"{path} is not a LoRA adapter directory (adapter_config.json, "
                              "adapter_model.safetensors)")
        name = f"grpo-{version}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if name != self.model:
            self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path),
                                                          "load_inplace": True}, reply="text")
            if self.model != self.base:
                try:
                    self._call("POST", "/v1/unload_lora_adapter", {"lora_name": self.model}, reply="text")
                except EngineError as e:  # rollout workers sharing a server: another one unloaded it already
                    if " answered 404" not in str(e):
                        raise
        self.model, self.version = name, version

    def completion(self, prompt_ids, text: str, temperature: float = 1.0) -> Completion:
        """A candidate the sampler did not write, scored by the in-process policy (the weights being trained)."""
        return self.policy.completion(prompt_ids, text, temperature)


def rollout_engine(url: str, policy):
    """What samples the groups for a `sampling.engine` setting: the policy in-process for "", else a RemoteEngine
    on the server at `url`."""
    if "," in url:
        raise ConfigError(f"sampling.engine = {url!r} lists several servers: one per rollout worker (loop.workers "
                          ">= 1, `grpo-agent loop --workers N`); an agent samples on one")
    return RemoteEngine(url, policy) if url else policy
