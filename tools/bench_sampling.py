"""Tokens/s of Policy.sample (with log-probs) against plain `model.generate`, same prompts, K and lengths.

Both sample the same prompts x K at the same temperature and top_p, alternating in one process, several
repetitions each; the median time is compared. Two regimes:
  fixed  - stop tokens disabled, every row generates exactly max_new_tokens (pure decode cost);
  stop   - the model's own stop token ends rows (real use; tokens/s counts tokens actually generated).
Target (issue #2): sample with log-probs costs no more than 1.1x plain generate.

    .venv/bin/python tools/bench_sampling.py [--model default] [--prompts 4 --k 8 --max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchlib import write_report

from grpo_agent.policy import load_policy

QUESTIONS = [
    "Why are snow leopards endangered, and what helps protect them?",
    "What is the main threat to sea turtle hatchlings on nesting beaches?",
    "Is it a good idea to keep a slow loris as a pet? Explain.",
    "How do anti-poaching patrols help African elephants?",
    "What is the IUCN Red List and what do its categories mean?",
    "Why does habitat fragmentation harm tigers?",
    "What can tourists do to avoid disturbing nesting seabirds?",
    "How does the ivory trade affect elephant populations?",
]


def run_generate(policy, chats, k, max_new_tokens, temperature, top_p, seed, stop):
    """Plain transformers generate on the same left-padded prompts; returns (seconds, generated tokens)."""
    from transformers import GenerationConfig

    tok = policy.tokenizer
    tok.padding_side = "left"
    prompts = [policy.encode_chat(c) for c in chats]
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt").to(policy.device)
    cfg = GenerationConfig(
        do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
        num_return_sequences=k, pad_token_id=policy.pad_token_id,
        eos_token_id=policy.stop_token_ids if stop else None,
    )
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = policy.model.generate(**batch, generation_config=cfg)
    seconds = time.perf_counter() - t0
    new = out[:, batch["input_ids"].shape[1] :]
    if stop:  # count up to and including the first stop token in each row
        is_stop = torch.isin(new, torch.tensor(policy.stop_token_ids, device=new.device))
        first = torch.where(is_stop.any(1), is_stop.float().argmax(1) + 1, torch.full_like(new[:, 0], new.shape[1]))
        n_tokens = int(first.sum())
    else:
        n_tokens = new.numel()
    return seconds, n_tokens


def run_sample(policy, chats, k, max_new_tokens, temperature, top_p, seed, stop):
    t0 = time.perf_counter()
    groups = policy.sample(
        chats, k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        stop_token_ids=None if stop else [],
    )
    seconds = time.perf_counter() - t0
    return seconds, sum(len(c.token_ids) for g in groups for c in g.completions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="tools/results/bench_sampling.json")
    args = ap.parse_args()

    policy = load_policy(args.model)
    chats = [[{"role": "user", "content": q}] for q in (QUESTIONS * 4)[: args.prompts]]
    common = dict(k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    run_sample(policy, chats[:1], **{**common, "k": 2, "max_new_tokens": 4}, seed=0, stop=True)  # warm-up
    results = {}
    for regime, stop in (("fixed", False), ("stop", True)):
        times = {"sample": [], "generate": []}
        tokens = {"sample": [], "generate": []}
        for rep in range(args.reps):  # alternate so that machine noise hits both alike
            for name, fn in (("sample", run_sample), ("generate", run_generate)):
                s, n = fn(policy, chats, **common, seed=rep, stop=stop)
                times[name].append(s)
                tokens[name].append(n)
        row = {}
        for name in times:
            tps = [n / s for n, s in zip(tokens[name], times[name])]
            row[name] = {
                "median_s": statistics.median(times[name]),
                "median_tokens_per_s": statistics.median(tps),
                "times_s": times[name],
                "tokens": tokens[name],
            }
        # Cost ratio per generated token: the regimes with stop tokens generate different lengths.
        row["cost_ratio_sample_over_generate"] = (
            row["generate"]["median_tokens_per_s"] / row["sample"]["median_tokens_per_s"]
        )
        results[regime] = row
        print(
            f"[{regime:5s}] sample {row['sample']['median_tokens_per_s']:7.1f} tok/s "
            f"({row['sample']['median_s']:.2f} s) | generate {row['generate']['median_tokens_per_s']:7.1f} tok/s "
            f"({row['generate']['median_s']:.2f} s) | cost ratio sample/generate "
            f"{row['cost_ratio_sample_over_generate']:.3f} (target <= 1.1)"
        )
    write_report({
        "benchmark": "sampling",
        "model": policy.name,
        "device": str(policy.device),
        "settings": {**common, "prompts": args.prompts, "reps": args.reps},
        "results": results,
    }, args.out)

if __name__ == "__main__":
    main()
