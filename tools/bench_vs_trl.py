"""Seconds per group end to end (sample K, score, update) and peak memory: TRL's GRPOTrainer against our
pipeline, on the same model, prompts, K, completion length, beta, learning rate and reward, in one run.

The reward is our composite self-score for both (TRL calls it as a reward function on the decoded texts,
with the question's retrieved facts passed as dataset columns). Each configuration runs in its own process
(so its peak RSS is its own), one group per optimizer step: --warmup groups, then --groups timed ones.
Configurations alternate between the two pipelines:
  equal settings: full fine-tuning, fp32;   best CPU settings: LoRA r=16 (all projections), fp32.

    .venv/bin/python tools/bench_vs_trl.py [--groups 4 --k 4 --max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from benchlib import DATA, read_jsonl, write_report

CONFIGS = ["ours_full", "trl_full", "ours_lora", "trl_lora"]


def setup(args):
    from grpo_agent.agent import GRPOAgent
    from grpo_agent.config import Config, SamplingConfig
    from grpo_agent.records import Passage
    from grpo_agent.retrieval import Embedder, FactIndex

    passages = [Passage(**p) for p in read_jsonl(DATA / "passages.jsonl")]
    index = FactIndex.build(passages, Embedder())
    cfg = Config(sampling=SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0))
    agent = GRPOAgent.from_config(cfg, index=index)
    questions = [q["question"] for q in read_jsonl(DATA / "train_questions.jsonl")][: args.warmup + args.groups]
    return agent, questions


def run_ours(args, lora: bool) -> dict:
    from grpo_agent.config import UpdateConfig
    from grpo_agent.updater import GRPOUpdater

    agent, questions = setup(args)
    updater = GRPOUpdater(agent.policy, UpdateConfig(lora=lora, beta=args.beta, learning_rate=args.lr,
                                                     groups_per_step=1))
    times = []
    for q in questions:
        t0 = time.perf_counter()
        groups, contexts = agent.sample_groups([q])
        agent.scorer.score_groups(groups, contexts)
        updater.train(groups)  # a zero-variance group is skipped without a backward pass
        times.append(time.perf_counter() - t0)
    return {"seconds": times[args.warmup :]}


def run_trl(args, lora: bool) -> dict:
    import datasets
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    from grpo_agent.rollout.policy import convert_bundled
    from grpo_agent.records import Completion, Group
    from grpo_agent.scoring import ScoreContext

    agent, questions = setup(args)
    model_dir = str(convert_bundled())
    rows = []
    for q in questions:  # the same chat our agent sends: system prompt, facts and the question
        passages = agent.retrieve([q])[0]
        rows.append({"prompt": agent.messages(q, [], passages), "question": q,
                     "passages": json.dumps([p.__dict__ for p in passages])})

    def composite_reward(completions, question, passages, **kw):
        from grpo_agent.records import Passage

        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        rewards = []
        for i in range(0, len(texts), args.k):  # one group per prompt
            group = Group([], [], [Completion(t, [], [], "stop") for t in texts[i : i + args.k]])
            ctx = ScoreContext(question[i], [Passage(**p) for p in json.loads(passages[i])])
            rewards += agent.scorer.score_group(group, ctx)[0].composite
        return rewards

    times, last = [], [time.perf_counter()]

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **kw):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

    config = trl.GRPOConfig(
        output_dir=f"/tmp/bench-vs-trl-{'lora' if lora else 'full'}", per_device_train_batch_size=args.k,
        num_generations=args.k, max_completion_length=args.max_new_tokens, beta=args.beta,
        learning_rate=args.lr, max_steps=len(questions), report_to="none", use_cpu=True, bf16=False,
        logging_steps=1000, save_strategy="no", temperature=1.0, shuffle_dataset=False, seed=0,
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        from grpo_agent.config import LORA_TARGETS

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=composite_reward, args=config,
                              train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft_config,
                              callbacks=[Timer()])
    last[0] = time.perf_counter()
    trainer.train()
    return {"seconds": times[args.warmup :]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=4, help="timed groups per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    ap.add_argument("--out", default="tools/results/bench_vs_trl.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        who, kind = args.child.split("_")
        result = (run_ours if who == "ours" else run_trl)(args, lora=kind == "lora")
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    rows = {}
    for name in args.configs:
        cmd = [sys.executable, __file__, "--child", name] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "configs", "out")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["seconds_per_group"] = sum(r["seconds"]) / len(r["seconds"])
        rows[name] = r
        print(f"{name:10s} {r['seconds_per_group']:6.1f} s/group  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    ratios = {kind: rows[f"ours_{kind}"]["seconds_per_group"] / rows[f"trl_{kind}"]["seconds_per_group"]
              for kind in ("full", "lora") if f"ours_{kind}" in rows and f"trl_{kind}" in rows}
    for kind, ratio in ratios.items():
        print(f"ours / TRL time per group, {kind}: {ratio:.2f}")
    write_report({"benchmark": "vs_trl", "settings": vars(args), "results": rows, "ours_over_trl": ratios}, args.out)


if __name__ == "__main__":
    main()
