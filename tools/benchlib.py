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
