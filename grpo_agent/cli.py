"""The grpo-agent command line: one `_add_<command>` (its flags and help) and one `_run_<command>` per
subcommand, each importing what it needs when it runs, so `grpo-agent --help` is instant.

Longer than most modules (~530 lines) on purpose: it is a flat list of eleven independent commands, each a
screen long and read on its own; splitting them across files would only add imports.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import GRPOAgentError

INTERRUPTED = ("interrupted: every logged group and the last checkpoint are intact; "
               "run the same command again to resume")


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
    from .rollout.policy import load_policy

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
    from .rollout.engines import rollout_engine

    params = {k: v for k, v in dataclasses.asdict(sampling).items() if k != "engine"}
    (group,) = rollout_engine(sampling.engine, policy).sample([messages], **params)
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


def _add_tasks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tasks", help="make questions from the passages of a fact index (no hand-written questions needed)",
        description="Write questions made from the passages of a fact index to a JSONL task file that `loop "
        "--tasks` reads: echo questions and clozes whose answer is a name, number or year a sentence states "
        "(kept with the task), and with --propose one question per passage written by the policy. A task is "
        "kept when retrieval with the question alone finds its passage in the top --top-k, its answer is not "
        "in the question and it is not a near-duplicate; --mixed-only also drops the ones the policy's K "
        "answers get all right or all wrong.")
    p.add_argument("--index", required=True, metavar="DIR", help="index directory written by `ingest`")
    p.add_argument("--out", required=True, metavar="FILE", help="JSONL task file to write")
    p.add_argument("--per-passage", type=int, default=2, help="tasks kept per passage at most (2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice among a passage's candidates")
    p.add_argument("--top-k", type=int, default=3, help="retrieval depth the source passage must be within (3)")
    p.add_argument("--propose", action="store_true", help="also have the policy write a question per passage")
    p.add_argument("--mixed-only", action="store_true",
                   help="keep a task only when the policy's K answers are neither all right nor all wrong")
    p.add_argument("-k", type=int, default=4, help="answers sampled per task for --mixed-only (4)")
    p.add_argument("--model", default="default", help="the policy for --propose and --mixed-only")
    p.add_argument("--embedder", default="default", help="the embedder the index was built with")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_tasks)


def _run_tasks(args: argparse.Namespace) -> int:
    from .retrieval import Embedder, FactIndex
    from .tasks import make_tasks, mixed_only, write_tasks

    if args.per_passage < 1 or args.top_k < 1 or args.k < 2:
        raise GRPOAgentError("--per-passage and --top-k must be >= 1 and -k >= 2")
    index = FactIndex.load(args.index, Embedder(args.embedder))
    if len(index) == 0:
        raise GRPOAgentError(f"the index {args.index} holds no passages: `grpo-agent ingest FILES --index "
                             f"{args.index}` first")
    policy = None
    if args.propose or args.mixed_only:
        from .rollout.policy import load_policy

        policy = load_policy(args.model)
    tasks, report = make_tasks(index, args.per_passage, args.seed, args.top_k, policy=policy if args.propose
                               else None, progress=not args.quiet)
    if args.mixed_only:
        tasks = mixed_only(tasks, policy, index, k=args.k, top_k=args.top_k, seed=args.seed, report=report,
                           progress=not args.quiet)
    if not tasks:
        raise GRPOAgentError(f"no task was kept ({report.summary()}); try a larger --top-k, or ingest longer "
                             "passages that state names, numbers or dates")
    write_tasks(tasks, args.out)
    print(f"{args.out}: {report.summary()}")
    return 0


def _corpus_tasks(args: argparse.Namespace, agent, minimum: int) -> list[dict]:
    """--tasks tasks made from the agent's fact index (one per passage), for calibrate and verifier."""
    from .tasks import make_tasks

    if agent.retriever is None:
        raise GRPOAgentError(f"{args.command} makes its tasks from a fact index: pass --index DIR (or set "
                             "retrieval.index)")
    made, report = make_tasks(agent.retriever, per_passage=1, seed=args.seed or 0, limit=args.tasks)
    tasks = [t.to_json() for t in made][: args.tasks]
    if len(tasks) < minimum:
        raise GRPOAgentError(f"the index gave {len(tasks)} task(s) ({report.summary()}); ingest more passages")
    return tasks


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="fit the composite's weights on tasks made from the corpus (no labelled dev split)",
        description="Make tasks from the fact index (as `grpo-agent tasks`), sample K answers to each, score "
        "them with the candidate signals, judge them by each task's answer span from its passage, and choose "
        "the weights whose composite ranks right answers above wrong ones best. With --config FILE the weights "
        "are written into its [scoring] table.")
    p.add_argument("--tasks", type=int, default=64, help="corpus tasks to calibrate on (64)")
    p.add_argument("--signals", nargs="+", default=None, metavar="NAME",
                   help="candidate signals (default: grounding consistency education)")
    p.add_argument("--dry-run", action="store_true", help="print the weights, do not write them")
    _add_agent_options(p)
    p.set_defaults(func=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import CANDIDATES, calibrate, write_weights

    if args.tasks < 2:
        raise GRPOAgentError("--tasks must be >= 2")
    cfg, agent = _agent(args, None, skip_verifier=True)
    tasks = _corpus_tasks(args, agent, minimum=2)
    k = args.k or max(cfg.sampling.k, 2)
    result = calibrate(agent, tasks, k=k, seed=args.seed or 0, signals=args.signals or CANDIDATES)
    m = result["metrics"]
    print(f"{result['tasks']} corpus tasks, {result['answers']} answers (right: {m['base_rate']:.3f})")
    for name, sm in result["per_signal"].items():
        print(f"  {name:12s} AUROC {sm['auroc']:.3f}  pairwise {sm['pairwise']:.3f}  best-of-K {sm['best_of_k']:.3f}")
    print(f"weights {result['weights']}: AUROC {m['auroc']:.3f}, pairwise {m['pairwise']:.3f}, "
          f"best-of-K {m['best_of_k']:.3f}")
    if args.config and not args.dry_run:
        write_weights(args.config, result["weights"])
        print(f"wrote them to {args.config} [scoring] weights")
    elif not args.config:
        print("pass --config FILE to write them into a config (grpo-agent init FILE makes one)")
    return 0


def _add_verifier(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verifier", help="train a verifier on tasks made from the corpus (the `verifier` signal)",
        description="Make tasks from the fact index (as `grpo-agent tasks`), sample K answers to each, label every "
        "answer by whether it states its task's answer span, and train a cross-encoder (initialised from the "
        "bundled MiniLM embedder) to score question + retrieved facts + answer. A fifth of the tasks is held out "
        "to report its AUROC. Use it with scoring.verifier = DIR and a weight for `verifier` in [scoring] "
        "weights.")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the verifier to")
    p.add_argument("--tasks", type=int, default=256, help="corpus tasks to sample answers to (256)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the labelled answers (2)")
    p.add_argument("--lr", type=float, default=3e-5, help="learning rate (3e-5)")
    p.add_argument("--examples", metavar="FILE",
                   help="JSONL of labelled answers: read it if it exists (no sampling), else write the sampled ones")
    _add_agent_options(p)
    p.set_defaults(func=_run_verifier)


def _run_verifier(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from .calibrate import metrics
    from .verifier import Verifier, VerifierError, collect_examples, pair, read_examples, write_examples

    if args.tasks < 5 or args.epochs < 1 or args.lr <= 0:
        raise GRPOAgentError("--tasks must be >= 5, --epochs >= 1 and --lr > 0")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise GRPOAgentError(f"{out} exists and is not empty: choose a new --out directory (nothing was written)")
    if args.examples and Path(args.examples).is_file():
        examples = read_examples(args.examples)
        print(f"read {len(examples)} labelled answers from {args.examples} (no sampling; delete it to sample anew)")
    else:
        if args.examples and not Path(args.examples).parent.is_dir():
            raise GRPOAgentError(f"--examples {args.examples}: its folder does not exist (nothing was sampled)")
        cfg, agent = _agent(args, None, skip_verifier=True)
        tasks = _corpus_tasks(args, agent, minimum=5)
        examples = collect_examples(agent, tasks, k=args.k or max(cfg.sampling.k, 2), seed=args.seed or 0)
        if args.examples:
            write_examples(args.examples, examples)
    questions = list(dict.fromkeys(e.question for e in examples))
    held = set(questions[::5])  # every fifth task, whole groups, for the held-out AUROC
    train = [e for e in examples if e.question not in held]
    test = [e for e in examples if e.question in held]
    verifier = Verifier.untrained()
    try:
        losses = verifier.fit(train, epochs=args.epochs, lr=args.lr, seed=args.seed or 0)
    except VerifierError as e:
        if args.examples:
            raise VerifierError(f"{e} (the answers are in {args.examples}: delete it, or give another --examples "
                                "path, before sampling again)") from e
        raise
    by_q: dict[str, list] = {}
    for e, p in zip(test, verifier.predict([pair(e.question, e.facts, e.answer) for e in test])):
        by_q.setdefault(e.question, []).append((p, e.label))
    m = metrics([np.array([p for p, _ in v]) for v in by_q.values()],
                [np.array([y for _, y in v]) for v in by_q.values()])
    verifier.meta.update(held_out=m, tasks=len(questions))
    verifier.save(out)
    print(f"{len(train)} answers to {len(questions) - len(held)} tasks (right: {sum(e.label for e in train) / len(train):.3f}),"
          f" loss by epoch {', '.join(f'{x:.3f}' for x in losses)}")
    print(f"held out ({len(test)} answers to {len(held)} tasks): AUROC {m['auroc']:.3f}, pairwise {m['pairwise']:.3f}, "
          f"best-of-K {m['best_of_k']:.3f} (base rate {m['base_rate']:.3f})")
    print(f"wrote {out}: set scoring.verifier = \"{out}\" and give `verifier` a weight in [scoring] weights")
    return 0


# ----- the agent: init, ask, collect, update, loop, eval, report ------------------------------------------
def _add_agent_options(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that run the agent; each overrides its config key."""
    p.add_argument("--config", help="TOML config file (write one with `grpo-agent init`)")
    p.add_argument("--model", help='policy.model: "default" (bundled SmolLM2-135M-Instruct) or a model directory')
    p.add_argument("--index", help="retrieval.index: a fact index directory written by `grpo-agent ingest`")
    p.add_argument("-k", type=int, help="sampling.k: answers sampled per task")
    p.add_argument("--max-new-tokens", type=int, help="sampling.max_new_tokens")
    p.add_argument("--temperature", type=float, help="sampling.temperature")
    p.add_argument("--seed", type=int, help="sampling.seed")
    p.add_argument("--engine", help="sampling.engine: sample on the vLLM server at this URL (loop --workers: several, "
                   "comma-separated, one per worker)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="policy.device")


def _config(args: argparse.Namespace):
    """The config file (or defaults) with the command line's overrides applied and validated."""
    import dataclasses

    from .config import load_config

    cfg = load_config(args.config)
    def override(section, *names):  # the flags this command has and the user gave
        flags = {n: getattr(args, n, None) for n in names}
        return dataclasses.replace(section, **{k: v for k, v in flags.items() if v is not None})

    return dataclasses.replace(
        cfg,
        policy=override(cfg.policy, "model", "device"),
        retrieval=override(cfg.retrieval, "index"),
        sampling=override(cfg.sampling, "k", "max_new_tokens", "temperature", "seed", "engine"),
    )


NO_INDEX = ("no fact index is configured (retrieval.index): answers are not grounded in facts and are scored "
            "on agreement alone. Build one with `grpo-agent ingest FILES --index DIR` and pass --index DIR")


def _agent(args: argparse.Namespace, store: str | None, skip_verifier: bool = False, sampling=None):
    """The config and the agent it wires; says once, on stderr, when no fact index grounds the answers.
    `sampling`: in place of the config's [sampling] (the loop's own, when rollout workers have the engines).
    `skip_verifier`: leave the verifier signal out of the agent's scorer (calibrate and verifier sample answers
    to judge them by the tasks' answers, and must work before any verifier exists)."""
    import dataclasses

    from .agent import GRPOAgent

    cfg = _config(args)
    if sampling is not None:
        cfg = dataclasses.replace(cfg, sampling=sampling)
    weights = {n: w for n, w in cfg.scoring.weights.items() if n != "verifier"}
    if skip_verifier and cfg.scoring.weights.get("verifier") and any(w > 0 for w in weights.values()):
        cfg = dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring, weights=weights))
    if not cfg.retrieval.index:
        print(f"grpo-agent {args.command}: warning: {NO_INDEX}", file=sys.stderr)
    return cfg, GRPOAgent.from_config(cfg, store_path=store)


def _follow(agent, cfg, run: str) -> None:
    """Serve what the run in `run` promoted: its adapter, or (training-free) its lesson library, loaded into a
    scratch store so that the run's own library is left alone."""
    import tempfile
    from pathlib import Path

    from .rundir import RunDir
    from .store import TrajectoryStore

    promoted = RunDir(run).read_promoted()
    if promoted is not None and promoted.kind == "lessons":
        scratch = TrajectoryStore(Path(tempfile.mkdtemp(prefix="grpo-agent-lessons-")) / "lessons.sqlite")
        agent.use_experience(cfg, store=scratch)
    agent.follow(run)


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a commented TOML config with every default",
                       description="Write a TOML config file holding every key with its default and a comment "
                       "saying what it does. Edit it and pass it to any command with --config.")
    p.add_argument("path", nargs="?", default="grpo-agent.toml", help="where to write it (grpo-agent.toml)")
    p.add_argument("--index", help="set retrieval.index in the file (a directory written by `ingest`)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_run_init)


def _run_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import config_template

    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"grpo-agent init: {path} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    text = config_template()
    if args.index:
        text = text.replace("# index = (unset)", f"index = {json.dumps(args.index)}")
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}: edit it, then pass --config {path}")
    return 0


def _add_ask(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="answer a question: the best of K self-scored answers and a table of all K",
                       description="Retrieve facts, sample K answers, score them with every configured signal and "
                       "print the best answer, then a table of the K candidates with each signal's score.")
    p.add_argument("question")
    _add_agent_options(p)
    p.add_argument("--store", help="log the group to this trajectory store (SQLite file)")
    p.add_argument("--run", help="a loop's run directory: answer with its promoted adapter")
    p.add_argument("--width", type=int, default=70, help="characters of each candidate shown in the table (70)")
    p.set_defaults(func=_run_ask)


def _run_ask(args: argparse.Namespace) -> int:
    cfg, agent = _agent(args, args.store)
    if args.run:
        _follow(agent, cfg, args.run)
    reply = agent.respond(args.question)
    print(f"{reply.answer}\n")
    if reply.passages:
        print("facts: " + "; ".join(f"{p.id} ({p.source})" if p.source else p.id for p in reply.passages))
    if len(reply.candidates) > 1:
        signals = list(reply.candidates[0].scores)
        print(f"\n{'':2} {'#':>2} {'composite':>9} " + " ".join(f"{s[:11]:>11}" for s in signals) + "  answer")
        order = sorted(range(len(reply.candidates)), key=lambda i: -(reply.candidates[i].composite or 0.0))
        for i in order:
            c = reply.candidates[i]
            mark = "*" if i == reply.best else " "
            text = c.text.replace("\n", " ")
            text = text if len(text) <= args.width else text[: args.width - 3] + "..."
            print(f"{mark:2} {i + 1:>2} {c.composite:9.3f} " + " ".join(f"{c.scores[s]:11.3f}" for s in signals)
                  + f"  {text}")
    if reply.guard is not None and reply.guard.request.harmful:
        print(f"\nrequest judged harmful ({reply.guard.request.reason()})"
              + ("; no answer declined it, so the guard served its safe completion (*)" if reply.guarded else ""))
        for i, why in enumerate(reply.explanations.get("alignment", []), 1):
            print(f"  #{i} alignment: {why.split('): ', 1)[-1]}")
    print(f"\npolicy {agent.policy.name} ({reply.policy_version}), K={len(reply.candidates)}"
          + (f"; logged as group {reply.group_id} in {args.store}" if reply.group_id else ""))
    return 0


def _add_collect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="answer a task file and log every scored group to the store",
                       description="Answer each task of a JSONL file ({\"question\": ...} per line) or a .txt file "
                       "(one question a line) with K self-scored samples, and log the groups to the store.")
    p.add_argument("--tasks", required=True, help="task file (.jsonl or .txt)")
    p.add_argument("--store", required=True, help="trajectory store (SQLite file, created if missing)")
    p.add_argument("--limit", type=int, help="only the first N tasks")
    p.add_argument("--batch", type=int, default=8, help="tasks sampled together (8)")
    _add_agent_options(p)
    p.set_defaults(func=_run_collect)


def _run_collect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .evaluation import read_tasks

    tasks = read_tasks(args.tasks)[: args.limit]
    if not tasks:
        raise GRPOAgentError(f"--limit {args.limit} leaves no task to collect")
    if args.k is not None and args.k < 2:
        raise GRPOAgentError(f"-k {args.k}: collect logs groups to train on, and a group needs K >= 2 answers")
    cfg, agent = _agent(args, args.store)
    if cfg.sampling.k < 2:
        raise GRPOAgentError(f"sampling.k = {cfg.sampling.k}: collect needs groups of K >= 2 answers")
    composites = []
    for i in tqdm(range(0, len(tasks), args.batch), desc="collect", unit="batch"):
        chunk = tasks[i : i + args.batch]
        replies = agent.respond_batch([t["question"] for t in chunk], [t["id"] for t in chunk], source="collect")
        composites += [c.composite for r in replies for c in r.candidates]
    print(f"logged {len(tasks)} groups of K={cfg.sampling.k} to {args.store}; mean composite "
          f"{sum(composites) / len(composites):.3f}; the store holds {agent.store.count_groups()} groups, "
          f"{agent.store.count_groups(unconsumed=True)} not yet trained on")
    return 0


def _add_update(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("update", help="run the GRPO updater over the store's groups not yet trained on",
                       description="Train the policy (a LoRA adapter by default) on every logged group no update "
                       "has consumed yet, checkpointing into RUN/checkpoints; resumes from the last checkpoint. "
                       "The update is recorded in the store; --promote also makes it the adapter agents "
                       "following RUN serve (`grpo-agent loop` promotes only after an eval gate).")
    p.add_argument("--store", required=True, help="trajectory store (SQLite file)")
    p.add_argument("--run", required=True, help="run directory for checkpoints, metrics and the promoted adapter")
    p.add_argument("--promote", action="store_true", help="promote the result without evaluating it")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--model", help="policy.model")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="policy.device")
    p.set_defaults(func=_run_update)


def _run_update(args: argparse.Namespace) -> int:
    from .rollout.policy import load_policy
    from .rundir import Promoted, RunDir
    from .store import TrajectoryStore
    from .updater import GRPOUpdater, latest_checkpoint, train_with_checkpoints

    cfg = _config(args)
    if args.promote and not cfg.update.lora:
        raise GRPOAgentError("--promote serves LoRA adapters; with update.lora = false load the checkpoint's "
                             "model.safetensors yourself")
    run = RunDir(args.run)
    with TrajectoryStore(args.store) as store:
        groups = store.groups(unconsumed=True)
        if not groups:
            print(f"{args.store}: every logged group has been trained on; collect more first")
            return 0
        updater = GRPOUpdater(load_policy(cfg.policy), cfg.update, output_dir=run.path)
        if updater.resume(run.checkpoints):
            print(f"resumed from step {updater.step}")
        history = train_with_checkpoints(updater, groups, run.checkpoints)
        checkpoint = latest_checkpoint(run.checkpoints) or updater.save_checkpoint(run.checkpoints)
        version = f"u{updater.step}"
        if args.promote:
            adapter = updater.save_adapter(run.snapshot(version, "adapter"))
            run.write_promoted(Promoted(version, "adapter", str(adapter.relative_to(run.path))))
        kls = [m["kl"] for m in history]
        store.record_update(round=0, policy_version=version, group_ids=[g.group_id for g in groups],
                            metrics={"steps": len(history), "kl_last": kls[-1] if kls else None},
                            promoted=args.promote, reason="grpo-agent update" + (" --promote" if args.promote else ""),
                            checkpoint=str(checkpoint))
    print(f"trained {len(history)} steps on {len(groups)} groups; checkpoint {checkpoint}"
          + (f"; promoted as {version}" if args.promote else "; not promoted (pass --promote, or use `loop`)"))
    return 0


def _add_loop(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loop", help="self-improvement rounds: collect, update, evaluate, promote or roll back",
                       description="Run rounds of: answer --tasks-per-round tasks and log the groups; train on "
                       "them; evaluate on held-out tasks; promote the update if the eval does not drop by more "
                       "than --margin (with --min-gain-z: if it rises by that many standard errors), else roll "
                       "back. Label-free by default (the gate is the composite self-score); --labels gates on gold "
                       "accuracy. Rerunning resumes the run directory.")
    p.add_argument("--rounds", type=int, required=True, help="rounds to have completed in RUN")
    p.add_argument("--tasks", help="task file to collect on (.jsonl or .txt)")
    p.add_argument("--eval-set", help="held-out task file (never trained on)")
    p.add_argument("--tasks-from-index", action="store_true",
                   help="make the tasks from the fact index's passages instead of a task file (as `grpo-agent tasks` "
                   "does), and the gate's from a held-out --eval-share of the passages unless --eval-set is given")
    p.add_argument("--eval-share", type=float, default=0.2,
                   help="share of the passages held out for gate tasks with --tasks-from-index (0.2)")
    p.add_argument("--run", required=True, help="run directory (store, checkpoints, promoted adapters)")
    p.add_argument("--tasks-per-round", type=int, help="loop.tasks_per_round")
    p.add_argument("--eval-size", type=int, help="loop.eval_size (0: the whole eval set)")
    p.add_argument("--margin", type=float, help="loop.margin")
    p.add_argument("--min-gain-z", type=float,
                   help="loop.min_gain_z: promote only a gain this many standard errors clear of noise")
    p.add_argument("--labels", action="store_true", help="gate on gold accuracy (loop.label_free = false)")
    p.add_argument("--mode", choices=["grpo", "training-free"],
                   help="loop.mode: fine-tune a LoRA adapter (grpo), or grow a library of lessons (training-free)")
    p.add_argument("--learning-rate", type=float, help="update.learning_rate")
    p.add_argument("--redteam-share", type=float,
                   help="loop.redteam_share: share of collected tasks that are red-team requests made from the safety "
                   "rules (practice in declining harm)")
    p.add_argument("--workers", type=int,
                   help="loop.workers: rollout workers on Ray that sample and score the groups (0: in this process)")
    p.add_argument("--ray-address", help='loop.ray_address: an existing Ray cluster for the workers ("auto", '
                   '"ray://host:10001"); default: a local one on 127.0.0.1')
    p.add_argument("--max-staleness", type=int,
                   help="loop.max_staleness: train on groups sampled up to this many promotions back; >= 1 with "
                   "--workers also collects the next round while this one updates")
    _add_agent_options(p)
    p.set_defaults(func=_run_loop)


def _run_loop(args: argparse.Namespace) -> int:
    import dataclasses

    from .evaluation import read_tasks
    from .loop import SelfImprovementLoop
    from .rundir import RunDir

    if args.tasks_from_index == bool(args.tasks):
        raise GRPOAgentError("give --tasks FILE, or --tasks-from-index to make the tasks from the fact index")
    if args.tasks and not args.eval_set:
        raise GRPOAgentError("--tasks needs --eval-set (held-out tasks for the gate)")
    cfg = _config(args)
    flags = {"tasks_per_round": args.tasks_per_round, "eval_size": args.eval_size, "margin": args.margin,
             "min_gain_z": args.min_gain_z, "label_free": False if args.labels else None, "mode": args.mode,
             "redteam_share": args.redteam_share, "workers": args.workers, "ray_address": args.ray_address,
             "max_staleness": args.max_staleness}
    loop_cfg = dataclasses.replace(cfg.loop, **{k: v for k, v in flags.items() if v is not None})
    # With rollout workers the engines are theirs: this process evaluates and trains in-process.
    here = dataclasses.replace(cfg.sampling, engine="") if loop_cfg.workers else None
    workers_cfg = dataclasses.replace(cfg, loop=loop_cfg)  # with the engines, for the workers
    cfg, agent = _agent(args, str(RunDir(args.run).store), sampling=here)
    if args.tasks_from_index:
        from .tasks import tasks_from_index

        if agent.retriever is None:
            raise GRPOAgentError("--tasks-from-index needs a fact index: pass --index DIR (or set retrieval.index)")
        try:
            tasks, made_eval, report = tasks_from_index(agent.retriever, args.eval_share, seed=0)
        except ValueError as e:
            raise GRPOAgentError(f"--tasks-from-index: {e}") from e
        eval_tasks = read_tasks(args.eval_set) if args.eval_set else made_eval
        print(f"tasks from the index: {report.summary()}; {len(tasks)} to train on, {len(eval_tasks)} for the gate")
        if not tasks or not eval_tasks:
            raise GRPOAgentError("the index gave no training or no gate task; ingest more passages, or pass --tasks")
    else:
        tasks, eval_tasks = read_tasks(args.tasks), read_tasks(args.eval_set)
    unlabelled = next((t for t in eval_tasks if "answer" not in t), None)
    if args.labels and unlabelled is not None:
        raise GRPOAgentError(f"--labels gates on gold answers, but task {unlabelled['id']} of {args.eval_set} has "
                             "no \"answer\"; add answers or drop --labels (the label-free gate)")
    update = dataclasses.replace(cfg.update, **({"learning_rate": args.learning_rate} if args.learning_rate else {}))
    if loop_cfg.mode == "training-free":
        agent.use_experience(cfg)
    workers = None
    if loop_cfg.workers:
        from .rollout.workers import RolloutWorkers

        workers = RolloutWorkers(workers_cfg, loop_cfg.workers,
                                 address=loop_cfg.ray_address or None, cpus=loop_cfg.worker_cpus,
                                 gpus=loop_cfg.worker_gpus)
    try:
        loop = SelfImprovementLoop(agent, args.run, tasks, eval_tasks, update, loop_cfg, workers=workers)
        rows = loop.run(args.rounds)
    finally:
        if workers is not None:
            workers.close()
    for row in rows:
        kl = row["kl"]
        learned = (f"{row['lessons']} lessons ({', '.join(f'{k} {v}' for k, v in sorted(row['library_ops'].items()))})"
                   if "lessons" in row else f"{row['steps']} steps, mean KL {'-' if kl is None else f'{kl:.4f}'}")
        safety = (f", harmful {row['harmful_rate']:.3f} of red-team answers" if row.get("harmful_rate") is not None
                  else "") + (f", refusals {row['refusal_rate']:.3f}" if row.get("refusal_rate") is not None else "")
        print(f"round {row['round']}: {row['groups']} groups, {learned}{safety}, eval {row['eval']['metric']} "
              f"{row['eval']['value']:.4f} -> {'promoted' if row['promoted'] else 'rolled back'} ({row['policy_version']})")
    if loop.state.stopped:
        print(f"stopped early: {loop.state.stopped}")
    print(f"{args.run}: {loop.state.round} rounds done; serving {loop.state.promoted_version}; "
          f"`grpo-agent report --run {args.run}` plots them")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate the policy on a held-out task set",
                       description="Accuracy of greedy answers against the set's gold answers (or, with "
                       "--label-free or a set without answers, the mean composite self-score of K samples).")
    p.add_argument("--set", required=True, dest="eval_set", help="task file; gold answers under \"answer\"")
    p.add_argument("--run", help="a loop's run directory: evaluate its promoted adapter")
    p.add_argument("--limit", type=int, help="only the first N tasks")
    p.add_argument("--label-free", action="store_true", help="the composite self-score, even with gold answers")
    p.add_argument("--json", help="also write the result to this JSON file")
    _add_agent_options(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate, read_tasks
    from .rundir import write_json_atomic

    tasks = read_tasks(args.eval_set)[: args.limit]
    cfg, agent = _agent(args, None)
    if args.run:
        _follow(agent, cfg, args.run)
    result = evaluate(agent, tasks, label_free=args.label_free, k=cfg.loop.eval_k)
    result.set, result.policy_version = args.eval_set, agent.policy.version
    print(f"{args.eval_set}: {result.metric} {result.value:.4f} over {result.n} tasks (policy {result.policy_version})")
    if args.json:
        write_json_atomic(args.json, result.to_dict())
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plot a loop's rounds to PNG and write a Markdown summary",
                       description="Plot eval per round (promoted and rolled-back rounds marked), the collected "
                       "answers' self-score and the KL per step into RUN/report/, with report.md summarising.")
    p.add_argument("--run", required=True, help="the loop's run directory")
    p.add_argument("--eval", nargs="*", default=[], metavar="NAME=FILE",
                   help="add results written by `grpo-agent eval --json FILE` to the summary")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import GRPOAgentError
    from .report import write_report

    extra = {}
    for item in args.eval:
        name, sep, file = item.partition("=")
        if not sep or not Path(file).is_file():
            raise GRPOAgentError(f"--eval {item!r}: give NAME=FILE with a file written by `grpo-agent eval --json`")
        extra[name] = json.loads(Path(file).read_text(encoding="utf-8"))
    path = write_report(args.run, extra)
    print(path.read_text(encoding="utf-8"))
    print(f"wrote {path} and its plots in {path.parent}")
    return 0


def _add_lessons(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lessons", help="list, export or load a training-free run's lesson library",
                       description="List the lessons a training-free loop learned (in RUN/store.sqlite), export "
                       "them as Markdown (.md) or JSON (.json) to read and edit, or load an edited file back.")
    p.add_argument("--run", required=True, help="the loop's run directory")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--export", metavar="FILE", help="write the library to FILE (.md or .json)")
    what.add_argument("--load", metavar="FILE", help="replace the library with FILE's lessons")
    p.set_defaults(func=_run_lessons)


def _run_lessons(args: argparse.Namespace) -> int:
    from .experience import ExperienceLibrary
    from .rundir import RunDir
    from .store import TrajectoryStore

    path = RunDir(args.run).store
    if not path.is_file():
        raise GRPOAgentError(f"{args.run} has no {path.name}: give the --run directory of `grpo-agent loop`")
    with TrajectoryStore(path) as store:
        library = ExperienceLibrary(store, embedder=None)
        if args.export:
            print(f"wrote {len(library.lessons())} lessons to {library.export(args.export)}")
        elif args.load:
            print(f"loaded {library.load(args.load)} lessons into {path}")
        else:
            for n, lesson in enumerate(library.lessons(), 1):
                print(f"{n:3}. {lesson.text}  [{lesson.lesson_id}, from {len(lesson.origin_groups)} group(s)]")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the agent behind an OpenAI-compatible HTTP API",
                       description="Serve POST /v1/chat/completions (streaming too), GET /v1/models, GET /health and "
                       "POST /v1/feedback. Every request is answered with the best of K self-scored samples and "
                       "logged to the store; requests that arrive together share one sampling call.")
    _add_agent_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", default="runs/serve/store.sqlite", help="trajectory store the groups are logged to")
    p.add_argument("--run", help="a loop's run directory: serve its promoted adapter, picking up new ones")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $GRPO_AGENT_API_KEY if set)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0, help="wait for more requests to batch (50)")
    p.add_argument("--max-batch", type=int, default=16, help="requests per sampling call (16)")
    p.add_argument("--shutdown-grace", type=float, default=3.0,
                   help="seconds the batch in hand may run after SIGTERM before its requests get a 503 (3)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import os

    from .server import ServerConfig, serve

    cfg, agent = _agent(args, args.store)
    if args.run:
        _follow(agent, cfg, args.run)
    key = args.api_key or os.environ.get("GRPO_AGENT_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"grpo-agent serve: warning: listening on {args.host} without an API key", file=sys.stderr)
    serve(agent, ServerConfig(host=args.host, port=args.port, api_key=key, batch_wait_ms=args.batch_wait_ms,
                              max_batch=args.max_batch, shutdown_grace_s=args.shutdown_grace))
    return 0


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
    _add_tasks(sub)
    _add_calibrate(sub)
    _add_verifier(sub)
    for add in (_add_init, _add_ask, _add_collect, _add_update, _add_loop, _add_eval, _add_report, _add_lessons,
                _add_serve):
        add(sub)
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
    except KeyboardInterrupt:
        print(f"\ngrpo-agent {args.command}: {INTERRUPTED}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
