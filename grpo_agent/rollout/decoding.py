"""The batched decode behind `Policy.sample`: B prompts, K samples each, one copy of each prompt's KV cache.

Prefill runs the B distinct prompts (in chunks, left-padded) and keeps their keys and values once. The
N = B*K sampled rows then decode one token a step through a registered attention function that attends
each row's query to its prompt's cache (shared by its K rows, never repeated) and to the row's own
completion cache (preallocated for max_new_tokens, written in place, never concatenated). A row that stops
leaves the batch; only the small completion caches are compacted then. Peak memory is about one copy of the
prompts' cache plus the completions' cache, and the per-token cost does not grow with the batch through
cache copies (issue #21; tools/bench_sampling.py measures it).

The attention is exactly softmax over [prompt keys, completion keys] (computed as two blocks, each with its
log-sum-exp, then merged by their shares of the total mass), so log-probs mean what a forward pass over the whole sequence recomputes. Models
whose attention does not go through transformers' attention interface, or that use a sliding window or
logit soft-capping, decode the plain way instead: the prompt cache repeated K times (`shares_prefix`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

ATTENTION = "grpo_shared_prefix"  # the name our attention function is registered under
PREFILL_TOKENS = 8192  # prompt tokens per prefill chunk: bounds prefill's activation memory


@dataclass
class SharedPrefix:
    """The caches of one decode: each prompt's keys and values once, each row's completion so far."""

    keys: list[torch.Tensor]  # per layer (B, Hkv, L, hd): the prompts, left-padded
    values: list[torch.Tensor]  # per layer (B, Hkv, L, hd)
    bias: torch.Tensor  # (B, 1, 1, L): 0 at a prompt's tokens, -inf at its padding (repeated per key-value head)
    k: int  # samples per prompt: grid row b*k + j is prompt b's j-th sample
    rows: torch.Tensor  # (n,) the grid row of each row still decoding
    new_keys: list[torch.Tensor] = field(default_factory=list)  # per layer (n, Hkv, T, hd), preallocated
    new_values: list[torch.Tensor] = field(default_factory=list)
    size: int = 0  # completion tokens each row can hold (max_new_tokens)
    t: int = 0  # completion tokens already cached; the token fed now is written at index t
    calls: int = 0  # attention calls made (0 after a step: the model bypassed the attention interface)

    def keep(self, keep: torch.Tensor) -> None:
        """Drop the rows that stopped: `keep` indexes the rows that go on. Their completion caches move to the
        front of the same buffers (no second copy is held)."""
        self.rows, n, end = self.rows[keep], len(keep), self.t + 1
        for caches in (self.new_keys, self.new_values):
            for i, c in enumerate(caches):
                c[:n, :, :end] = c[keep, :, :end]
                caches[i] = c[:n]

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        """(n, Hkv, g, m) per row -> (B, Hkv, K*g, m) per prompt, zeros where a row has stopped."""
        B, K = len(self.keys[0]), self.k
        n, Hkv, g, m = x.shape
        if n < B * K:  # some rows have stopped: put the others in their places
            grid = x.new_zeros(B * K, Hkv, g, m)
            grid[self.rows] = x
            x = grid
        return x.view(B, K, Hkv, g, m).transpose(1, 2).reshape(B, Hkv, K * g, m)

    def _rows(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """(B, Hkv, K*g, m) per prompt -> (n, Hkv, g, m) for the rows still decoding."""
        B, Hkv, _, m = x.shape
        x = x.view(B, Hkv, self.k, g, m).transpose(1, 2).reshape(B * self.k, Hkv, g, m)
        return x if len(self.rows) == B * self.k else x[self.rows]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """One decode step of one layer: query (n, H, 1, hd), this token's key and value (n, Hkv, 1, hd);
        returns (n, 1, H, hd), as transformers' attention functions do.

        softmax over [prompt keys, completion keys] in two blocks: each block's attention output and
        log-sum-exp, then the outputs weighted by their blocks' shares of the total mass. The prompt block is
        computed per prompt (B, Hkv, K*g, L): its K rows read its keys once."""
        self.calls += 1
        n, H, _, hd = query.shape
        Hkv = key.shape[1]
        g = H // Hkv  # query heads per key-value head (grouped-query attention)
        if len(self.new_keys) <= layer:  # first step: allocate this layer's completion cache
            self.new_keys.append(key.new_empty(n, Hkv, self.size, hd))
            self.new_values.append(value.new_empty(n, Hkv, self.size, hd))
        new_k, new_v = self.new_keys[layer], self.new_values[layer]
        new_k[:, :, self.t] = key[:, :, 0]
        new_v[:, :, self.t] = value[:, :, 0]
        new_k, new_v = new_k[:, :, : self.t + 1], new_v[:, :, : self.t + 1]
        q = query[:, :, 0].reshape(n, Hkv, g, hd)  # query head h reads key-value head h // g
        scale = hd**-0.5 if scaling is None else scaling
        if self.bias.shape[1] != Hkv:  # once: the padding bias per (prompt, key-value head)
            self.bias = self.bias.repeat_interleave(Hkv, 1)  # (B, Hkv, 1, L)
        s = torch.baddbmm(self.bias.flatten(0, 1), self._grid(q).flatten(0, 1),  # (B*Hkv, K*g, L)
                           self.keys[layer].flatten(0, 1).transpose(1, 2), alpha=scale)
        lse = torch.logsumexp(s, -1, keepdim=True)
        out = (s.sub_(lse).exp_() @ self.values[layer].flatten(0, 1)).view(-1, Hkv, self.k * g, hd)
        out, lse = self._rows(out, g), self._rows(lse.view(-1, Hkv, self.k * g, 1), g)  # (n, Hkv, g, hd), (.., 1)
        s_new = (q @ new_k.transpose(-1, -2)) * scale  # (n, Hkv, g, t+1): the row's own completion so far
        lse_new = torch.logsumexp(s_new, -1, keepdim=True)
        out_new = s_new.sub_(lse_new).exp_() @ new_v
        w = torch.sigmoid(lse - lse_new)  # the prompt block's share of the softmax mass
        return (out_new + w * (out - out_new)).reshape(n, 1, H, hd)


_lock = threading.Lock()
_swapped: dict[int, list] = {}  # id(config) -> [decodes running, the attention settings to restore]


def _register() -> None:
    """Register the attention function (and, for any forward that runs while it is set, the mask of sdpa)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ATTENTION in ALL_ATTENTION_FUNCTIONS._global_mapping:
        return

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_prefix=None,
                  **kwargs):
        if shared_prefix is None:  # another forward (a concurrent thread's) while ours is set: plain sdpa
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
        if any(kwargs.get(a) is not None for a in ("sliding_window", "softcap", "s_aux")):
            raise RuntimeError(f"{type(module).__name__} needs {sorted(kwargs)} in its attention, which the shared-"
                               "prefix decode does not do; decoding.shares_prefix should have refused this model")
        return shared_prefix.attend(module.layer_idx, query, key, value, scaling), None

    ALL_ATTENTION_FUNCTIONS.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def shares_prefix(model: torch.nn.Module) -> bool:
    """Whether `model` can decode with the shared-prefix attention: a transformers model on the attention
    interface (sdpa or eager), every layer full attention (no sliding window in use, no linear-attention or
    convolution layers) and no logit soft-capping."""
    if not getattr(model, "_supports_attention_backend", False):  # Falcon, Bloom ... (PeftModel forwards it)
        return False
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", ATTENTION):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return not any(getattr(config, a, None) for a in ("attn_logit_softcapping", "final_logit_softcapping"))


def _attention_settings(config) -> dict:
    """The config's attention implementation and each sub-config's, as the config's setter takes them."""
    subs = {name: getattr(config, name)._attn_implementation for name in getattr(config, "sub_configs", {})
            if getattr(config, name, None) is not None}
    return {"": config._attn_implementation, **subs}


@contextmanager
def shared_prefix_attention(model: torch.nn.Module):
    """Route `model`'s attention through the shared-prefix function while decoding. Counted per model config,
    so concurrent decodes of one model share the setting and the last one out restores it; a forward without a
    SharedPrefix (another thread's) still gets sdpa."""
    _register()
    config = model.config
    with _lock:
        entry = _swapped.setdefault(id(config), [0, None])
        if entry[0] == 0:
            entry[1] = _attention_settings(config)
            config._attn_implementation = ATTENTION
        entry[0] += 1
    try:
        yield
    finally:
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                config._attn_implementation = entry[1]
                del _swapped[id(config)]


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (counting real tokens only) on the device."""
    B, L = len(prompts), max(map(len, prompts))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, L - len(p) :] = torch.tensor(p)
        attn[b, L - len(p) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # as in an unpadded pass
    return input_ids.to(device), attn.to(device), pos.to(device)


def prefill(model, prompts: list[list[int]], pad_id: int, device, k: int = 1, size: int = 1
            ) -> tuple[SharedPrefix, torch.Tensor]:
    """Run the prompts in chunks of about PREFILL_TOKENS tokens; return their caches, right-aligned in one
    (B, Hkv, L, hd) tensor per layer, ready for K rows per prompt of up to `size` new tokens each, and the
    logits at each prompt's last token (B, V)."""
    from transformers import DynamicCache

    B, L = len(prompts), max(map(len, prompts))
    per_chunk = max(1, PREFILL_TOKENS // L)
    keys, values, logits = [], [], []
    bias = torch.full((B, 1, 1, L), float("-inf"), device=device)
    for start in range(0, B, per_chunk):
        chunk = prompts[start : start + per_chunk]
        input_ids, attn, pos = left_pad(chunk, pad_id, device)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, cache=cache, logits_to_keep=1)
        logits.append(out.logits[:, -1])
        width = input_ids.shape[1]
        for i, layer in enumerate(cache.layers):
            if i == len(keys):
                keys.append(layer.keys.new_zeros(B, layer.keys.shape[1], L, layer.keys.shape[-1]))
                values.append(layer.values.new_zeros(B, layer.values.shape[1], L, layer.values.shape[-1]))
            keys[i][start : start + len(chunk), :, L - width :] = layer.keys
            values[i][start : start + len(chunk), :, L - width :] = layer.values
        bias[start : start + len(chunk), 0, 0, L - width :] = torch.where(attn.bool(), 0.0, float("-inf"))
    bias = bias.to(keys[0].dtype)
    return (SharedPrefix(keys, values, bias, k=k, rows=torch.arange(B * k, device=device), size=size),
            torch.cat(logits))


@dataclass
class Decoded:
    """What a decode produced for its N = B*K rows (row r samples for prompt r // K)."""

    tokens: torch.Tensor  # (N, T) sampled ids, pad after a row's length
    logprobs: torch.Tensor  # (N, T) tempered log-probs of the sampled ids
    lengths: list[int]  # tokens per row, its stop token included
    stopped: list[bool]  # whether each row ended on a stop token (else it hit max_new_tokens)


@torch.inference_mode()
def decode(model, prompts: list[list[int]], k: int, max_new_tokens: int, temperature: float, top_p: float,
           gen: torch.Generator, stops: torch.Tensor, pad_id: int, first: torch.Tensor | None = None) -> Decoded:
    """Sample K completions of each prompt, one token a step for all rows still going (module docstring).
    `first`: the token ids the first token is chosen among (by their probabilities, renormalised)."""
    device = next(model.parameters()).device
    shared = shares_prefix(model)
    if shared:
        state, logits = prefill(model, prompts, pad_id, device, k, max_new_tokens)
    else:  # the plain way: the prompts' cache repeated K times, concatenated to every step
        from transformers import DynamicCache

        input_ids, attn, pos = left_pad(prompts, pad_id, device)
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, cache=cache,
                       logits_to_keep=1).logits[:, -1]
        cache.batch_repeat_interleave(k)
        attn = attn.repeat_interleave(k, 0)
    logits = logits.repeat_interleave(k, 0)  # (N, V)
    next_pos = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(k)  # (N,)
    N = len(prompts) * k
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    stopped = torch.zeros(N, dtype=torch.bool, device=device)
    active = torch.arange(N, device=device)  # output row of each row still in the batch

    with shared_prefix_attention(model) if shared else nullcontext():
        for t in range(max_new_tokens):
            tok, lp = pick(logits.float(), temperature, top_p, gen, among=first if t == 0 else None)
            tokens[active, t], logps[active, t], lengths[active] = tok, lp, t + 1
            done = torch.isin(tok, stops)
            if t == max_new_tokens - 1:
                stopped[active] = done
                break
            if done.any():
                stopped[active[done]] = True
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                active, tok, next_pos = active[keep], tok[keep], next_pos[keep]
                if shared:
                    state.keep(keep)
                else:
                    cache.batch_select_indices(keep)
                    attn = attn[keep]
            if shared:
                state.t, state.calls = t, 0
                out = model(input_ids=tok[:, None], position_ids=next_pos[:, None], use_cache=False,
                            shared_prefix=state)
                if state.calls == 0:
                    raise RuntimeError(f"{type(model).__name__} does not call transformers' attention interface; "
                                       "decoding.shares_prefix should have said so")
            else:
                attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
                out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None], cache=cache)
            logits, next_pos = out.logits[:, -1], next_pos + 1
    return Decoded(tokens.cpu(), logps.cpu(), lengths.tolist(), stopped.tolist())


def pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator,
         among: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from logits (n, V); return the ids (n,) and their tempered log-probs (n,).
    `among` (m,): choose only among these ids, by their probabilities renormalised over them (top_p not applied);
    the log-probs are still the full softmax's, as a forward pass recomputes them."""
    if among is not None:
        logp = torch.log_softmax(logits / temperature if temperature else logits, dim=-1)
        pair = logp[:, among]  # (n, m)
        if temperature == 0:
            choice = pair.argmax(dim=-1)
        else:
            choice = torch.multinomial(torch.softmax(pair, dim=-1), 1, generator=gen).squeeze(1)
        tok = among[choice]
        return tok, logp.gather(1, tok[:, None]).squeeze(1)
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tok = logp.argmax(dim=-1)
    else:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        probs = logp.exp()
        if top_p < 1.0:
            probs = top_p_filter(probs, top_p)
        tok = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability reaches top_p (the top token always stays)."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # mass before this token already reaches top_p
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
