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


def resumable(out: Path, settings: dict) -> tuple[list[dict], set[tuple]]:
    """The results a resumable benchmark already wrote to `out` and the (system, seed) pairs they cover; refuses a
    file measured with other settings."""
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if previous.get("results") and previous.get("settings") != settings:
        raise SystemExit(f"{out} holds results measured with other settings ({previous.get('settings')}); "
                         "give another --out, or move that file away to start over")
    results = previous.get("results", [])
    return results, {(r["system"], r["seed"]) for r in results}


def units(systems: list[str], seeds: list[int]) -> list[tuple[str, int | None]]:
    """(system, seed) pairs to run: the base model once (it learns nothing), every other system per seed."""
    return ([("base", None)] if "base" in systems else []) + [(s, seed) for seed in seeds for s in systems
                                                              if s != "base"]


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
