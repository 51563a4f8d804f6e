"""The report of a loop's run directory: PNG plots per round and a Markdown summary.

    write_report("runs/demo")  ->  runs/demo/report/{scores,eval,kl,monitors}.png and report.md

Reads rounds.jsonl (one line per round, round 0 the baseline) and metrics.jsonl (the updater's steps).
"""

from __future__ import annotations

from pathlib import Path

from .errors import GRPOAgentError
from .rundir import BASE, RunDir


MONITORS = [("entropy", "entropy of sampled tokens (nats)"), ("distinct_rate", "distinct answers per group"),
            ("answer_tokens", "answer length (tokens)"), ("zero_variance_rate", "zero-variance groups")]


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_report(run_dir: str | Path, extra: dict[str, dict] | None = None) -> Path:
    """Write plots and report.md for the run in `run_dir`; `extra` adds named evals (e.g. before/after
    accuracy on a labelled set) to the summary. Returns the path of report.md."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run = RunDir(run_dir)
    rounds = run.rounds()
    if not rounds:
        raise GRPOAgentError(f"{run.path} holds no rounds.jsonl: run `grpo-agent loop --run {run.path}` first")
    steps = run.steps()
    out = run.report_dir
    out.mkdir(parents=True, exist_ok=True)
    done = [r for r in rounds if r["round"] > 0]
    xs = [r["round"] for r in rounds]
    evals = [r["eval"]["value"] for r in rounds]
    metric = rounds[0]["eval"]["metric"]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, evals, "-", color="0.6", zorder=1)
    for r, v in zip(rounds, evals):
        ax.scatter(r["round"], v, color="tab:green" if r["promoted"] else "tab:red", zorder=2,
                   marker="o" if r["promoted"] else "x")
    ax.set(xlabel="round (0 = before training)", ylabel=f"held-out {metric}",
           title="Eval per round (green: promoted, red x: rolled back)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["round"] for r in done], [r.get("train_composite") for r in done], "o-", label="collected groups")
    ax.set(xlabel="round", ylabel="mean composite self-score", title="Self-score of the answers collected")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if steps:
        ax.plot([m["step"] for m in steps], [m["kl"] for m in steps], ".-", label="KL to reference per step")
        ax.legend()
    ax.set(xlabel="optimizer step", ylabel="KL (k3)", title="KL to the reference model")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "kl.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(8, 5.5))
    for ax, (key, label) in zip(axes.flat, MONITORS):
        ax.plot([r["round"] for r in done], [r.get(key) for r in done], "o-")
        ax.set(xlabel="round", title=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Collapse monitors of the answers collected each round")
    fig.tight_layout()
    fig.savefig(out / "monitors.png", dpi=110)
    plt.close(fig)

    lines = [f"# Self-improvement run: {run.path}", ""]
    if extra:
        lines += ["| evaluation | metric | value | n |", "|---|---|---|---|"]
        lines += [f"| {name} | {e['metric']} | {_fmt(e['value'])} | {e['n']} |" for name, e in extra.items()]
        lines.append("")
    promoted = sum(r["promoted"] for r in done)
    lines += [f"{len(done)} rounds: {promoted} promoted, {len(done) - promoted} rolled back. "
              f"Gate metric: held-out {metric}.", "",
              "| round | groups | zero-var | train composite | steps | loss | mean KL | eval | promoted | version |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        lines.append(f"| {r['round']} | {_fmt(r.get('groups'))} | {_fmt(r.get('zero_variance_groups'))} | "
                     f"{_fmt(r.get('train_composite'))} | {_fmt(r.get('steps'))} | {_fmt(r.get('loss'), 4)} | "
                     f"{_fmt(r.get('kl'), 5)} | {_fmt(r['eval']['value'])} | {'yes' if r['promoted'] else 'no'} | "
                     f"{r['policy_version']} |")
    if done:
        names = sorted({n for r in done for n in (r.get("signals") or {})})
        lines += ["", "| round | entropy | answer tokens | distinct answers | zero-variance groups | "
                  + " | ".join(names) + " |", "|---" * (5 + len(names)) + "|"]
        for r in done:
            sig = r.get("signals") or {}
            lines.append(f"| {r['round']} | {_fmt(r.get('entropy'))} | {_fmt(r.get('answer_tokens'), 1)} | "
                         f"{_fmt(r.get('distinct_rate'))} | {_fmt(r.get('zero_variance_rate'))} | "
                         + " | ".join(_fmt(sig.get(n)) for n in names) + " |")
        safety = [r for r in done if r.get("harmful_rate") is not None or r.get("refusal_rate") is not None]
        if safety:  # the safety rules are configured: harmful answers to red-team tasks, refusals of the others
            lines += ["", "| round | red-team groups | harmful answers (red-team) | refusals (other tasks) |",
                      "|---|---|---|---|"]
            lines += [f"| {r['round']} | {r.get('redteam_groups', 0)} | {_fmt(r.get('harmful_rate'))} | "
                      f"{_fmt(r.get('refusal_rate'))} |" for r in safety]
        episodic = [r for r in done if r.get("episodes")]
        if episodic:  # loop.unit = "episode": how the policy used its tool
            lines += ["", "| round | episodes | turns / episode | tool calls / episode | tool errors / episode | "
                      "episodes that searched |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['round']} | {r['episodes']} | {_fmt(r['turns'], 2)} | {_fmt(r['tool_calls'], 2)} | "
                      f"{_fmt(r['tool_errors'], 2)} | {_fmt(r['search_rate'])} |" for r in episodic]
        gold = [r for r in done if r.get("labelled_groups")]
        if gold:  # the tasks had gold answers: does the self-score rank the right answer first?
            lines += ["", "| round | labelled groups | top-ranked answer right | sampled answers right |",
                      "|---|---|---|---|"]
            lines += [f"| {r['round']} | {r['labelled_groups']} | {_fmt(r['top_correct_rate'])} | "
                      f"{_fmt(r['sample_correct_rate'])} |" for r in gold]
    if done:  # why each round was kept or rolled back, in the gate's own words
        lines += ["", "Gate decisions:", ""] + [f"- round {r['round']}: {r['reason']}" for r in done if r.get("reason")]
    fired = [r for r in done if r.get("guards")]
    state = run.read_state()
    stopped = state.stopped if state else None
    references = [r.get("reference", BASE) for r in done]
    resets = [r for r, ref, before in zip(done, references, [BASE] + references) if ref != before]
    if fired or stopped or resets:
        lines += ["", "Guards and reference resets:", ""] + [f"- round {r['round']}: {'; '.join(r['guards'])}"
                                                            for r in fired]
        lines += [f"- the loop stopped: {stopped}"] if stopped else []
        lines += [f"- round {r['round']}: KL reference reset to the promoted policy {r['reference']}" for r in resets]
    lines += ["", "![eval](eval.png) ![scores](scores.png) ![kl](kl.png) ![monitors](monitors.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
