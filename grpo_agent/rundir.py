"""The run directory of `grpo-agent loop` (and `update`): its layout, its typed records, and the atomic file
writes every module uses. The one module that knows where a run keeps what.

    store.sqlite          the trajectory store (groups, completions, updates, feedback, lessons)
    state.json            LoopState: rounds done, the task cursor, the promoted version and its eval, a
                          journaled gate decision (PendingGate) while one is being applied
    rounds.jsonl          one line per round, round 0 the baseline eval (what `report` plots)
    metrics.jsonl         the updater's per-step metrics
    checkpoints/          the updater's checkpoints (adapter, optimizer, consumed groups)
    promoted/<version>    each promoted adapter, or <version>.lessons.json in training-free mode
    rejected/<version>    the snapshot of each rolled-back round, kept to inspect, never served
    promoted.json         Promoted: the version agents following the run serve, and where it lies
    report/               `grpo-agent report`'s plots and report.md

Every file is replaced whole (`replacing`, `write_json_atomic`): a reader, or a restart after a kill, sees
the old file or the new one, never half of one. JSON-lines logs are appended a line at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from .errors import LoopError

BASE = "base"  # the version of the starting weights (the zero adapter) or the starting lesson library
KINDS = ("adapter", "lessons")  # what a run promotes: a LoRA adapter (grpo) or a lesson library (training-free)


# ----- atomic writes -----------------------------------------------------------------------------------------
@contextmanager
def replacing(path: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write (a file or a directory), renamed onto `path` once
    the block succeeds and removed if it fails: readers never see half of it. A directory already at `path` is
    first set aside as `.<name>.old-<pid>` (a kill between the two renames leaves it there, complete). With
    `keep_existing`, a `path` that exists by the end (another process finished first) is kept and ours dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if keep_existing:
            try:
                if not path.exists():
                    tmp.rename(path)
            except OSError:  # another process put its copy there between the check and the rename
                if not path.exists():
                    raise
            _remove(tmp)
        elif tmp.is_dir():
            aside = path.with_name(f".{path.name}.old-{os.getpid()}")
            if path.exists():
                path.rename(aside)
            tmp.rename(path)
            _remove(aside)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Replace `path` with `data` as JSON in one step, flushed to disk before it takes the name (a power cut
    cannot leave it empty)."""
    with replacing(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSON-lines file (none when it does not exist yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one object to a JSON-lines file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


# ----- typed records -----------------------------------------------------------------------------------------
def _from_dict(cls: type, data: Any, where: str):
    """Build dataclass `cls` from a dict read back from JSON, refusing keys it does not know."""
    if not isinstance(data, dict):
        raise LoopError(f"{where} holds {type(data).__name__}, not an object; restore it or start a new run directory")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LoopError(f"{where} has keys this grpo-agent does not know ({', '.join(unknown)}): it was written by a "
                        "newer version; upgrade grpo-agent or start a new run directory")
    return cls(**data)


@dataclass
class EvalResult:
    """An evaluation of the policy on held-out tasks."""

    metric: str  # "accuracy" (greedy answers against gold) or "composite" (the label-free self-score)
    value: float  # the mean over tasks
    n: int  # tasks evaluated
    values: list[float] = field(default_factory=list)  # each task's score, in task order (for paired gates)
    monitors: dict[str, float | None] | None = None  # label-free: entropy, distinct_rate, answer_tokens of the samples
    set: str | None = None  # the task file evaluated (`grpo-agent eval`)
    policy_version: str | None = None  # the weights evaluated (`grpo-agent eval`)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("metric", "value", "n")}

    @classmethod
    def from_dict(cls, data: dict, where: str = "an eval result") -> "EvalResult":
        return _from_dict(cls, data, where)


@dataclass
class PendingGate:
    """A gate decision journaled before it is applied, so a kill mid-gate finishes it on restart."""

    round: int
    eval: EvalResult
    promoted: bool
    reason: str  # the gate's (or a guard's) own words
    version: str  # the version served after the gate: r<round> when promoted, else the one kept
    group_ids: list[str]  # the groups the round consumed (trained on, or dropped as stale)
    seconds: float  # the round's wall time up to the decision
    guards: list[str] = field(default_factory=list)  # collapse guards that fired
    stale: list[str] = field(default_factory=list)  # of group_ids, those dropped untrained (loop.max_staleness)

    def to_dict(self) -> dict:
        return {**asdict(self), "eval": self.eval.to_dict()}

    @classmethod
    def from_dict(cls, data: dict, where: str = "state.json's pending gate") -> "PendingGate":
        gate = _from_dict(cls, data, where)
        gate.eval = EvalResult.from_dict(gate.eval, where)
        return gate


@dataclass
class LoopState:
    """What a loop keeps in state.json to resume where it stopped."""

    mode: str = "grpo"  # grpo | training-free; a run directory keeps the mode it started in
    round: int = 0  # rounds completed
    cursor: int = 0  # tasks collected so far (the next is tasks[cursor % len(tasks)])
    promoted_version: str = BASE  # what agents following the run serve
    promoted_eval: float | None = None  # its eval value (None: the baseline is not evaluated yet)
    promoted_values: list[float] | None = None  # its per-task eval values, for the paired gate
    eval_identity: dict | None = None  # what makes two evals comparable (tasks, metric, sampling, scoring)
    best_monitors: dict[str, float] = field(default_factory=dict)  # the guards' yardstick over promoted policies
    rollbacks_in_a_row: int = 0
    stopped: str | None = None  # why the loop stopped early, when a guard stopped it
    update_from_step: int | None = None  # the optimizer step this round's update started after
    rescored_round: int | None = None  # the round whose groups the store holds re-scored with clients' ratings
    reference_version: str = BASE  # the KL reference: the base, or a promoted snapshot it was reset to
    reference_round: int | None = None  # the round whose start reset the reference
    pending: PendingGate | None = None  # a gate decision being applied
    run_id: str = ""  # made once per run: the loop's group ids are it and each task's place in the stream

    def to_dict(self) -> dict:
        return {**asdict(self), "pending": self.pending.to_dict() if self.pending else None}

    @classmethod
    def from_dict(cls, data: dict, where: str = "state.json") -> "LoopState":
        state = _from_dict(cls, data, where)
        if state.pending is not None:
            state.pending = PendingGate.from_dict(state.pending)
        return state


@dataclass
class Promoted:
    """promoted.json: the version a run serves and where its snapshot lies (relative to the run directory)."""

    version: str
    kind: str  # adapter | lessons
    path: str

    def to_dict(self) -> dict:
        return {"version": self.version, self.kind: self.path}


# ----- the layout --------------------------------------------------------------------------------------------
class RunDir:
    """A run directory's paths and files (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    store = property(lambda self: self.path / "store.sqlite")
    state_file = property(lambda self: self.path / "state.json")
    rounds_file = property(lambda self: self.path / "rounds.jsonl")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    promoted_file = property(lambda self: self.path / "promoted.json")
    report_dir = property(lambda self: self.path / "report")

    def is_run(self) -> bool:
        """Whether a loop or an update has written here."""
        return self.promoted_file.is_file() or self.state_file.is_file()

    def snapshot(self, version: str, kind: str, folder: str = "promoted") -> Path:
        """Where the snapshot of `version` lies: an adapter directory, or a lesson file."""
        return self.path / folder / (version if kind == "adapter" else f"{version}.lessons.json")

    # state.json
    def read_state(self) -> LoopState | None:
        """The loop's state, or None before the first save."""
        if not self.state_file.is_file():
            return None
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoopError(f"{self.state_file} is not readable JSON ({e}); restore it, or start a new run "
                            "directory") from e
        return LoopState.from_dict(data, str(self.state_file))

    def write_state(self, state: LoopState) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_file, state.to_dict())

    # promoted.json
    def read_promoted(self) -> Promoted | None:
        """The promoted pointer, or None when nothing is promoted yet."""
        if not self.promoted_file.is_file():
            return None
        try:
            data = json.loads(self.promoted_file.read_text(encoding="utf-8"))
            kind = next(k for k in KINDS if k in data)
            return Promoted(str(data["version"]), kind, str(data[kind]))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, StopIteration) as e:
            raise LoopError(f"{self.promoted_file} is malformed ({e!r}): it should hold {{\"version\": ..., "
                            "\"adapter\": ...}} (or \"lessons\": ... for a training-free run)") from e

    def write_promoted(self, promoted: Promoted) -> None:
        write_json_atomic(self.promoted_file, promoted.to_dict())

    def promoted_target(self, promoted: Promoted) -> Path:
        """The promoted snapshot's path on this machine."""
        target = Path(promoted.path)
        return target if target.is_absolute() else self.path / target

    # the JSON-lines logs
    def rounds(self) -> list[dict]:
        """Every round recorded so far (round 0 is the baseline)."""
        return read_jsonl(self.rounds_file)

    def append_round(self, row: dict) -> None:
        append_jsonl(self.rounds_file, row)

    def steps(self) -> list[dict]:
        """The updater's per-step metrics, in the order written (a step redone after a resume appears twice)."""
        return read_jsonl(self.metrics_file)
