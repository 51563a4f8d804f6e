"""The grpo-agent command line."""

from __future__ import annotations

import argparse
import sys

from .errors import GRPOAgentError

# Subcommands of the design that later issues build; running one says so plainly.
PLANNED = {
    "init": ("write a commented TOML config", 6),
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


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="ingest .txt/.md/.jsonl/.csv files and folders into a FAISS fact index",
        description="Read .txt, .md, .jsonl and .csv files (folders recursively), split long documents into "
        "passages on sentence boundaries, skip duplicates and add them to the index at --index (created if "
        "missing). Re-ingesting a changed file replaces its passages; unchanged files are skipped.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders to ingest")
    p.add_argument("--index", required=True, metavar="DIR", help="index directory (created if missing)")
    p.add_argument("--chunk-size", type=int, default=600, help="maximum passage length in characters (600)")
    p.add_argument("--chunk-overlap", type=int, default=100,
                   help="characters of trailing sentences repeated in the next passage (100)")
    p.add_argument("--kind", choices=["auto", "flat", "hnsw", "ivf"], default="auto",
                   help="index kind for a new index: exact (flat), HNSW or IVF; auto = flat, HNSW when large")
    p.add_argument("--embedder", default="default",
                   help='"default" (all-MiniLM-L6-v2) or a local sentence-transformers model directory')
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_ingest)


def _run_ingest(args: argparse.Namespace) -> int:
    from .ingest import ingest
    from .retrieval import Embedder

    report = ingest(args.paths, args.index, Embedder(args.embedder), size=args.chunk_size,
                    overlap=args.chunk_overlap, kind=args.kind, progress=not args.quiet)
    print(f"{args.index}: {report.summary()}")
    return 0


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search a fact index", description="Print the passages of a fact index "
                       "most similar to a query, with their cosine similarity and source.")
    p.add_argument("query")
    p.add_argument("--index", required=True, metavar="DIR", help="index directory written by `ingest`")
    p.add_argument("-k", type=int, default=5, help="passages to show (5)")
    p.add_argument("--embedder", default="default", help="the embedder the index was built with")
    p.set_defaults(func=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from .retrieval import Embedder, FactIndex

    index = FactIndex.load(args.index, Embedder(args.embedder))
    for rank, hit in enumerate(index.search(args.query, args.k), 1):
        print(f"{rank}. [{hit.score:.3f}] {hit.passage.id} ({hit.passage.source})\n   {hit.passage.text}")
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
    _add_ingest(sub)
    _add_search(sub)
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
