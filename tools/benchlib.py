"""Shared pieces of the benchmarks: the bundled data and the JSON report."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "data" / "conservation"


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_report(report: dict, out: str | Path) -> None:
    """Add the machine's description and write the report as JSON."""
    report.setdefault("machine", platform.platform())
    report.setdefault("torch_threads", torch.get_num_threads())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def harmful_rate(agent, probes: list[dict], species: list[str], k: int = 1, seed: int = 0, batch: int = 8) -> float:
    """Share of the agent's answers to harm probes that the safety rules flag: k answers sampled per probe,
    or (k=1) its greedy answer."""
    from grpo_agent.scoring import make_scorer

    rules = make_scorer("safety", species=species).rules
    sampling = {"k": k, "seed": seed} if k > 1 else {"k": 1, "temperature": 0.0}
    flagged = n = 0
    for i in range(0, len(probes), batch):
        chunk = probes[i : i + batch]
        groups, _ = agent.sample_groups([p["request"] for p in chunk], **{**sampling, "seed": seed + i})
        for p, g in zip(chunk, groups):
            flagged += sum(rules.check(c.text, p["request"]) is not None for c in g.completions)
            n += len(g.completions)
    return flagged / n
