"""The grpo-agent command line."""

from __future__ import annotations

import argparse
import sys

from .errors import GRPOAgentError

# Subcommands of the design that later issues build; running one says so plainly.
PLANNED = {
    "init": ("write a commented TOML config", 6),
    "ingest": ("ingest .txt/.md/.jsonl/.csv files into a FAISS fact index", 3),
    "ask": ("answer a question: retrieve, sample K, score, print the best and a table of candidates", 6),
    "collect": ("sample and score groups on a task set and log them to the trajectory store", 6),
    "update": ("run the GRPO updater over logged groups", 5),
    "loop": ("run the self-improvement loop: collect, update, evaluate, promote or roll back", 6),
    "eval": ("evaluate the policy on a held-out question set", 6),
    "report": ("plot scores, eval accuracy, KL and promoted/rolled-back rounds to PNG", 6),
    "serve": ("serve the agent behind an OpenAI-compatible HTTP API", 10),
}


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample K answers to one question from the policy (no retrieval, no scoring)",
        description="Sample a group of K answers to one question from the policy and print them with their "
        "finish reason, length and mean log-prob. Flags override the config file.",
    )
    p.add_argument("question", help="the user message")
    p.add_argument("--config", help="TOML config file (default: built-in defaults)")
    p.add_argument("--model", help='"default" (bundled SmolLM2-135M-Instruct) or a local model directory')
    p.add_argument("--system", help="an optional system message")
    p.add_argument("-k", type=int, help="group size (answers to sample)")
    p.add_argument("--max-new-tokens", type=int, help="completion length cap in tokens")
    p.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, help="fixed seed for a reproducible group")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run the model")
    p.set_defaults(func=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    import dataclasses

    from .config import load_config
    from .policy import load_policy

    cfg = load_config(args.config)
    policy_cfg = dataclasses.replace(
        cfg.policy, **{k: v for k, v in {"model": args.model, "device": args.device}.items() if v is not None}
    )
    flags = {"k": args.k, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
             "top_p": args.top_p, "seed": args.seed}
    sampling = dataclasses.replace(cfg.sampling, **{k: v for k, v in flags.items() if v is not None})
    policy = load_policy(policy_cfg)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.question}
    ]
    (group,) = policy.sample([messages], **dataclasses.asdict(sampling))
    print(f"Q: {args.question}  ({policy.name}, K={sampling.k}, temperature={sampling.temperature})\n")
    for i, c in enumerate(group.completions, 1):
        mean_lp = sum(c.logprobs) / len(c.logprobs)
        print(f"[{i}] {c.finish_reason}, {len(c.token_ids)} tokens, mean log-prob {mean_lp:.2f}")
        print(f"    {c.text}\n")
    return 0


def _add_planned(sub: argparse._SubParsersAction, name: str, what: str, issue: int) -> None:
    p = sub.add_parser(name, help=f"{what} [not built yet]", description=f"{what}. Not built yet (issue #{issue}).")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def run(args: argparse.Namespace) -> int:
        print(f"grpo-agent {name}: not built yet; it is planned in issue #{issue} ({what}).", file=sys.stderr)
        return 2

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-agent",
        description="Let an LLM agent improve itself with Group Relative Policy Optimization: sample K answers, "
        "score them itself (no reward model, no labels), serve the best, and learn from the logged groups.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_sample(sub)
    for name, (what, issue) in PLANNED.items():
        _add_planned(sub, name, what, issue)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except GRPOAgentError as e:
        print(f"grpo-agent {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
