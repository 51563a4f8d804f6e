"""Update throughput of GRPOUpdater on the bundled model, against this machine's own matmul rate.

Each configuration (LoRA or full fine-tuning, fp32 or bf16 autocast) runs in its own process, so that its
peak memory (max RSS) is its own: a few warm-up steps, then timed optimizer steps on fixed synthetic groups
(prompt and completion token ids drawn from the vocabulary, advantages +-1, old log-probs 0). Achieved
GFLOP/s counts 6 x parameters x tokens (forward + backward, as the issue defines it; a LoRA backward skips
the frozen weights' gradients, so it does less work than that count says). The machine's rate is a large
fp32 (and bf16) matmul measured in the same run. Where bf16 matmul runs at under a quarter of the fp32 rate
(CPUs without native bf16 units, where PyTorch emulates it), the bf16 configurations are reported as skipped
with both rates, since an update step would take hours; --force-bf16 runs them anyway.

    .venv/bin/python tools/bench_update.py [--steps 3 --completions 16 --prompt-len 96 --completion-len 64]
"""

from __future__ import annotations

import argparse
import json
import resource
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
    from grpo_agent.records import Completion, Group
    from grpo_agent.updater import GRPOUpdater

    lora, bf16 = CONFIGS[name]
    policy = load_policy("default", device="cpu")
    n_params = sum(p.numel() for p in policy.model.parameters())
    g = torch.Generator().manual_seed(0)
    vocab = policy.model.config.vocab_size
    groups = []
    for _ in range(args.groups):
        prompt = torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist()
        completions = [Completion("", torch.randint(10, vocab, (args.completion_len,), generator=g).tolist(),
                                  [-1.0] * args.completion_len, "length", advantage=1.0 if i % 2 else -1.0)
                       for i in range(args.completions // args.groups)]
        groups.append(Group(messages=[], prompt_token_ids=prompt, completions=completions))
    cfg = UpdateConfig(lora=lora, bf16_autocast=bf16, beta=0.0, groups_per_step=args.groups,
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
    ap.add_argument("--out", default="tools/results/bench_update.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args)))
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
