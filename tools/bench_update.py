"""Update throughput of GRPOUpdater on the bundled model, against this machine's own matmul rate.

Each configuration (LoRA or full fine-tuning, fp32 or bf16 autocast) runs in its own process, so that its
peak memory (max RSS) is its own: a few warm-up steps, then timed optimizer steps on fixed synthetic groups
(prompt and completion token ids drawn from the vocabulary, advantages +-1, old log-probs 0). Achieved
GFLOP/s counts 6 x parameters x tokens (forward + backward, as the issue defines it; a LoRA backward skips
the frozen weights' gradients, so it does less work than that count says). The machine's rate is a large
fp32 (and bf16) matmul measured in the same run. Every row runs in full here (update.share_prefix off), so the
count is the work done. Where bf16 matmul runs at under a quarter of the fp32 rate
(CPUs without native bf16 units, where PyTorch emulates it), the bf16 configurations are reported as skipped
with both rates, since an update step would take hours; --force-bf16 runs them anyway.

    .venv/bin/python tools/bench_update.py [--steps 3 --completions 16 --prompt-len 96 --completion-len 64]

Two parts measure issue #23's savings, each as a ratio in one run (LoRA, fp32):
  --part prefix   seconds per group (K = --k completions of --completion-len tokens) with the prompt run once per
                  group (update.share_prefix) and without, at prompt lengths 64, 256 and 1024; the two settings
                  alternate step by step on one updater, so both see the same machine;
  --part logits   peak memory (max RSS, one process each, above the loaded model) of one update step over 1k, 4k
                  and 16k completion tokens in one micro-batch, with the logits made 1024 tokens at a time
                  (update.logit_chunk_tokens) and all at once; a step killed for want of memory is reported
                  as such.

    .venv/bin/python tools/bench_update.py --part prefix      # tools/results/bench_update_prefix.json
    .venv/bin/python tools/bench_update.py --part logits      # tools/results/bench_update_logits.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from benchlib import write_report

CONFIGS = {"lora_fp32": (True, False), "lora_bf16": (True, True), "full_fp32": (False, False),
           "full_bf16": (False, True)}


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of an n x n matmul, repeated; a first small probe picks a smaller n when the rate is low."""
    if n > 256:
        probe = matmul_gflops(dtype, 256, 2)
        if probe < 10:  # emulated dtype: a 2048^3 product would take minutes
            n, reps = 512, 2
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def run_one(name: str, args: argparse.Namespace) -> dict:
    """One configuration, in this process (called in a child process by main)."""
    from grpo_agent.config import UpdateConfig
    from grpo_agent.rollout.policy import load_policy
    from grpo_agent.updater import GRPOUpdater

    lora, bf16 = CONFIGS[name]
    policy = load_policy("default", device="cpu")
    n_params = sum(p.numel() for p in policy.model.parameters())
    groups = synthetic_groups(policy.model.config.vocab_size, args.groups, args.completions // args.groups,
                              args.prompt_len, args.completion_len)
    cfg = UpdateConfig(lora=lora, bf16_autocast=bf16, beta=0.0, groups_per_step=args.groups, share_prefix=False,
                       micro_batch_tokens=args.micro_batch_tokens, num_iterations=args.warmup + args.steps)
    updater = GRPOUpdater(policy, cfg)
    history = updater.train(groups)
    timed = history[args.warmup :]
    seconds = sum(m["seconds"] for m in timed)
    tokens = args.completions * (args.prompt_len + args.completion_len) * len(timed)
    return {
        "config": name, "params": n_params,
        "trainable_params": sum(p.numel() for p in updater.params),
        "tokens_per_s": tokens / seconds, "seconds_per_step": seconds / len(timed),
        "achieved_gflops": 6 * n_params * tokens / seconds / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def synthetic_groups(vocab: int, groups: int, k: int, prompt_len: int, completion_len: int, seed: int = 0):
    """Groups of K completions of random token ids under one random prompt each, advantages +-1."""
    from grpo_agent.records import Completion, Group

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(groups):
        prompt = torch.randint(10, vocab, (prompt_len,), generator=g).tolist()
        completions = [Completion("", torch.randint(10, vocab, (completion_len,), generator=g).tolist(),
                                  [-1.0] * completion_len, "length", advantage=1.0 if i % 2 else -1.0)
                       for i in range(k)]
        out.append(Group(messages=[], prompt_token_ids=prompt, completions=completions))
    return out


def run_prefix(args: argparse.Namespace) -> list[dict]:
    """Seconds per group with and without the shared prefix, alternating step by step, per prompt length."""
    from grpo_agent.config import UpdateConfig
    from grpo_agent.rollout.policy import load_policy
    from grpo_agent.updater import GRPOUpdater

    policy = load_policy("default", device="cpu")
    updater = GRPOUpdater(policy, UpdateConfig(beta=0.0, micro_batch_tokens=args.micro_batch_tokens))
    rows = []
    for prompt_len in args.prompt_lens:
        groups = synthetic_groups(policy.model.config.vocab_size, args.warmup + args.steps, args.k, prompt_len,
                                  args.completion_len, seed=prompt_len)
        seconds: dict[bool, list[float]] = {True: [], False: []}
        for i, group in enumerate(groups):
            for share in (True, False) if i % 2 else (False, True):
                updater.share_prefix = share
                (m,) = updater.train([dataclasses.replace(group, group_id=f"{group.group_id}-{share}")])
                if i >= args.warmup:
                    seconds[share].append(m["seconds"])
        row = {"prompt_len": prompt_len, "k": args.k, "completion_len": args.completion_len,
               "shared_seconds": statistics.median(seconds[True]), "full_seconds": statistics.median(seconds[False])}
        row["speedup"] = row["full_seconds"] / row["shared_seconds"]
        rows.append(row)
        print(f"prompt {prompt_len:5d}: {row['full_seconds']:6.2f} s a group with K full rows, "
              f"{row['shared_seconds']:6.2f} s with the prompt once: {row['speedup']:.2f}x", flush=True)
    return rows


def run_logits(args: argparse.Namespace) -> dict:
    """One step over --completion-tokens completion tokens in one micro-batch (in this process): peak RSS."""
    from grpo_agent.config import UpdateConfig
    from grpo_agent.rollout.policy import load_policy
    from grpo_agent.updater import GRPOUpdater

    policy = load_policy("default", device="cpu")
    k = 16
    (group,) = synthetic_groups(policy.model.config.vocab_size, 1, k, 32, args.completion_tokens // k)
    updater = GRPOUpdater(policy, UpdateConfig(beta=0.0, micro_batch_tokens=10**9, share_prefix=False,
                                               logit_chunk_tokens=args.chunk))
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (m,) = updater.train([group])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"completion_tokens": args.completion_tokens, "logit_chunk_tokens": args.chunk, "loaded_rss_mb": loaded,
            "peak_rss_mb": peak, "step_mb": peak - loaded, "seconds": m["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--groups", type=int, default=2, help="groups per step")
    ap.add_argument("--completions", type=int, default=16, help="completions per step")
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--force-bf16", action="store_true", help="run bf16 configurations even where bf16 is emulated")
    ap.add_argument("--out", help="the JSON report (default tools/results/bench_update[_PART].json)")
    ap.add_argument("--part", choices=["throughput", "prefix", "logits"], default="throughput")
    ap.add_argument("--k", type=int, default=8, help="--part prefix: completions per group")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[64, 256, 1024], help="--part prefix")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384],
                    help="--part logits: completion tokens in the micro-batch")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--completion-tokens", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out = args.out or f"tools/results/bench_update{'' if args.part == 'throughput' else '_' + args.part}.json"
    if args.child == "logits":
        print(json.dumps(run_logits(args)))
        return
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return
    if args.part == "prefix":
        if "--completion-len" not in sys.argv:
            args.completion_len = 48
        rows = run_prefix(args)
        write_report({"benchmark": "update_prefix", "settings": vars(args), "results": rows}, args.out)
        return
    if args.part == "logits":
        rows = []
        for tokens in args.tokens:
            for chunk in (1024, 0):
                cmd = [sys.executable, __file__, "--child", "logits", f"--completion-tokens={tokens}",
                       f"--chunk={chunk}"]
                result = subprocess.run(cmd, capture_output=True, text=True)
                how = "all at once" if chunk == 0 else f"{chunk} at a time"
                if result.returncode != 0:  # -9: killed by the kernel for want of memory
                    rows.append({"completion_tokens": tokens, "logit_chunk_tokens": chunk,
                                 "failed": f"exit {result.returncode}", "stderr": result.stderr[-500:]})
                    print(f"{tokens:6d} completion tokens, logits {how:16s} failed: exit {result.returncode}"
                          + (" (killed: out of memory)" if result.returncode == -9 else ""), flush=True)
                else:
                    rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                    print(f"{tokens:6d} completion tokens, logits {how:16s} peak RSS {rows[-1]['peak_rss_mb']:7.0f} MB "
                          f"({rows[-1]['step_mb']:6.0f} MB above the loaded model), {rows[-1]['seconds']:.1f} s",
                          flush=True)
                write_report({"benchmark": "update_logits", "settings": vars(args), "results": rows}, args.out)
        return

    rows = []
    rates = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"matmul 2048^3: fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.1f} GFLOP/s")
    skipped = {}
    for name in args.configs:
        if name.endswith("bf16") and rates["bf16"] < 0.25 * rates["fp32"] and not args.force_bf16:
            skipped[name] = (f"bf16 matmul runs at {rates['bf16']:.2f} GFLOP/s here against {rates['fp32']:.1f} "
                             "in fp32 (no native bf16): use --force-bf16 to run it anyway")
            print(f"{name:10s} skipped: {skipped[name]}", flush=True)
            continue
        cmd = [sys.executable, __file__, "--child", name] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("child", "configs", "out", "force_bf16")
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        row["fraction_of_matmul"] = row["achieved_gflops"] / rates["bf16" if name.endswith("bf16") else "fp32"]
        rows.append(row)
        print(f"{name:10s} {row['tokens_per_s']:7.0f} tok/s  {row['seconds_per_step']:6.1f} s/step  "
              f"{row['achieved_gflops']:6.1f} GFLOP/s = {row['fraction_of_matmul']:.2f} of matmul  "
              f"peak RSS {row['peak_rss_mb']:.0f} MB  ({row['trainable_params']:,} trainable)", flush=True)
    rates["fp32_after"] = matmul_gflops(torch.float32)
    write_report({"benchmark": "update", "matmul_gflops": rates, "settings": vars(args), "results": rows,
                  "skipped": skipped}, args.out)


if __name__ == "__main__":
    main()
