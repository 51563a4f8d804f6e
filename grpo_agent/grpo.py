"""The GRPO objective as pure tensor functions, named and defined as TRL names them (GRPOTrainer).

Shapes: B completions in a micro-batch, T completion tokens (right-padded), V vocabulary.

    ratio_t   = exp(logp_t - old_logp_t)                         token level, or
    ratio     = exp(sum_t m_t (logp_t - old_logp_t) / sum_t m_t)  sequence level (GSPO), one per completion
    surrogate = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl_t      = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        k3 estimator of KL(pi || pi_ref)
    loss_t    = surrogate_t + beta * ratio * kl_t                 (ratio: TRL's use_bias_correction_kl, default)
and the per-token losses are reduced by `loss_type`:
    grpo     mean over completions of (sum_t m_t loss_t / sum_t m_t)      (DeepSeekMath)
    bnpo     sum m loss / sum m over the micro-batch                      (token mean)
    dr_grpo  sum m loss / (B * max_completion_length)                     (Dr. GRPO)
    dapo     sum m loss / (tokens in the whole accumulated batch)         (DAPO)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .config import IMPORTANCE_LEVELS, LOSS_TYPES


LOGIT_CHUNK = 1024  # completion tokens whose logits exist at once (forward and backward); 0: all of them


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = LOGIT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p of the last `n_completion` tokens of each row given what precedes them, at `temperature`.

    input_ids, attention_mask: (B, L) = prompt (left-padded) + completion (right-padded). Returns (B, T) log-probs
    of logits / temperature (T = n_completion; 0 means greedy sampling, whose log-probs are at temperature 1)
    and, optionally, the (B, T) entropy of each next-token distribution. The logits are made `chunk` tokens at a
    time from the final hidden states (token_logprobs), never all B x T x V at once.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # real tokens only, as when sampling
    hidden = _final_hidden(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    if hidden is None:  # a model whose logits are not its output head of the hidden states: the whole logits
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     logits_to_keep=n_completion + 1)
        return _logprobs(out.logits[:, :-1], input_ids[:, -n_completion:], temperature, with_entropy)
    return token_logprobs(output_head(model), hidden[:, -n_completion - 1 : -1], input_ids[:, -n_completion:],
                          temperature, with_entropy, chunk)


def shared_prefix_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    owner: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = LOGIT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """completion_logprobs for completions that share prompts, each prompt run once (Prefix Grouper, arXiv
    2506.05433): the G prompts' keys and values, with their gradients, feed all B completions.

    prompt_ids, prompt_mask: (G, Lp) left-padded; owner: (B,) the prompt of each completion; completion_ids,
    completion_mask: (B, T) right-padded. The same values and gradients as completion_logprobs over the B rows
    of prompt + completion (the completions attend to their prompt's cached keys exactly as to its tokens).
    None for a model whose logits are not its output head of the final hidden states (use completion_logprobs).
    """
    from transformers import DynamicCache

    inner = getattr(model, "module", model)  # under DDP its forward runs once (the prompts); one backward for both
    cache = DynamicCache(config=inner.config)
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    first = _final_hidden(model, input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids,
                          cache=cache, use_cache=True)
    if first is None:
        return None
    for layer in cache.layers:  # each completion's copy of its prompt's keys and values (gradients flow back)
        layer.keys, layer.values = layer.keys.index_select(0, owner), layer.values.index_select(0, owner)
    hidden = first[:, -1:].index_select(0, owner)  # (B, 1, H): predicts each completion's first token
    if completion_ids.shape[1] > 1:  # the last completion token predicts nothing: it is not run
        start = prompt_mask.sum(-1).index_select(0, owner).unsqueeze(-1)  # (B, 1) each prompt's length
        steps = torch.arange(completion_ids.shape[1] - 1, device=owner.device)
        rest = _final_hidden(inner, input_ids=completion_ids[:, :-1], position_ids=start + steps, cache=cache,
                             attention_mask=torch.cat([prompt_mask.index_select(0, owner),
                                                       completion_mask[:, :-1].to(prompt_mask.dtype)], 1))
        if rest is None:
            return None
        hidden = torch.cat([hidden, rest], 1)
    return token_logprobs(output_head(model), hidden, completion_ids, temperature, with_entropy, chunk)


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module that turns final hidden states into logits (a LoRA-wrapped one when LoRA trains it)."""
    return getattr(model, "module", model).get_output_embeddings()


_HEAD_GIVES_LOGITS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _final_hidden(model: torch.nn.Module, **inputs) -> torch.Tensor | None:
    """The final hidden states (B, L, H) of a forward pass that makes the logits of its last position only; None
    when the model's logits are not its output head of those hidden states (soft-capped or scaled logits). Known
    per model after its first forward, which compares the two."""
    inner = getattr(model, "module", model)
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    if any(getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        _HEAD_GIVES_LOGITS[inner] = False
    if _HEAD_GIVES_LOGITS.get(inner) is False:
        return None
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1] if out.hidden_states else None
    if inner not in _HEAD_GIVES_LOGITS:
        _HEAD_GIVES_LOGITS[inner] = hidden is not None and _head_gives(output_head(model), hidden, out.logits)
    return hidden if _HEAD_GIVES_LOGITS[inner] else None


@torch.no_grad()
def _head_gives(head: torch.nn.Module, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether the head of the last hidden state, at the shape the model used, gives the model's logits (to fp32
    rounding, or bf16's when the model ran in it)."""
    full = hidden.dtype == torch.float32 and not torch.is_autocast_enabled(hidden.device.type)
    tol = 1e-3 if full else 2e-2
    return torch.allclose(head(hidden[:, -1:]).float(), logits.float(), rtol=tol, atol=tol)


def token_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False, chunk: int = LOGIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets) (B, T) from the hidden states that predict them (B, T, H), the logits `chunk` tokens at a
    time: with gradients on, each chunk's logits are remade in the backward pass instead of kept, so memory holds
    one chunk's B x V-sized logits, not B x T x V. The same values and gradients as the whole logits at once."""
    B, T, H = hidden.shape
    flat_h, flat_y = hidden.reshape(B * T, H), targets.reshape(B * T)
    size = chunk if chunk > 0 else B * T
    logps, entropies = [], []
    for i in range(0, B * T, size):
        h, y = flat_h[i : i + size], flat_y[i : i + size]
        if torch.is_grad_enabled() and h.requires_grad and size < B * T:
            logp, entropy = torch.utils.checkpoint.checkpoint(_chunk_logprobs, head, h, y, temperature,
                                                              with_entropy, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(head, h, y, temperature, with_entropy)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps).view(B, T)
    return logp, torch.cat(entropies).view(B, T) if with_entropy else None


def _chunk_logprobs(head, h, y, temperature, with_entropy):
    logp, entropy = _logprobs(head(h), y, temperature, with_entropy)
    return logp, entropy if with_entropy else torch.zeros_like(logp)


def _logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """log_softmax(logits / temperature) at the targets, and the distribution's entropy (no gradient)."""
    logits = logits.float()
    if temperature and temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from samples of pi: exp(d) - d - 1, d = ref - logp (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """pi / pi_old per token (B, T), or per sequence (B, 1) as the exp of the masked mean log-ratio (GSPO)."""
    log_ratio = logp - old_logp
    if level == "token":
        return torch.exp(log_ratio)
    if level == "sequence":
        return torch.exp(((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1))
    raise ValueError(f"importance_sampling_level = {level!r}: choose one of {', '.join(IMPORTANCE_LEVELS)}")


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """PPO's pessimistic clipped objective, negated to a loss: -min(r A, clip(r, 1-eps_low, 1+eps_high) A)."""
    a = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (B, 1)
    return -torch.min(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)


def reduce_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str,
                max_completion_length: int | None = None, num_items: float | None = None) -> torch.Tensor:
    """Reduce (B, T) per-token losses to a scalar the way `loss_type` defines (module docstring)."""
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        return masked.sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type == "dapo":
        total = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=masked.dtype)
        return masked.sum() / total.clamp(min=1.0)
    raise ValueError(f"loss_type = {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")


@dataclass
class LossParts:
    """The loss and what to log about it."""

    loss: torch.Tensor  # scalar, differentiable
    kl: float  # masked mean of the per-token KL to the reference (0 when beta = 0)
    clip_fraction: float  # share of tokens whose ratio was clipped in the direction that matters


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: float | None = None,
    use_bias_correction_kl: bool = True,
) -> LossParts:
    """The full GRPO loss for a micro-batch: clipped surrogate + beta * k3 KL, reduced by `loss_type`.

    logp (B, T) carries gradients; old_logp, ref_logp (B, T) and advantages (B,) do not; mask (B, T) is 1 on
    completion tokens.
    """
    mask = mask.to(logp.dtype)
    ratio = importance_ratio(logp, old_logp, mask, importance_sampling_level)
    per_token = clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high)
    kl_value = 0.0
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp, the reference model's log-probs")
        kl = kl_k3(logp, ref_logp)
        kl_value = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1.0))
        if use_bias_correction_kl:  # weight by pi / pi_old: unbiased reverse-KL gradient off-policy (DeepSeek-V3.2)
            kl = kl * ratio
        per_token = per_token + beta * kl
    loss = reduce_loss(per_token, mask, loss_type, max_completion_length, num_items)
    with torch.no_grad():
        a = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        clipped = ((ratio < 1 - epsilon_low) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
        clipped = clipped.expand_as(mask).to(mask.dtype)
        clip_fraction = float((clipped * mask).sum() / mask.sum().clamp(min=1.0))
    return LossParts(loss=loss, kl=kl_value, clip_fraction=clip_fraction)
