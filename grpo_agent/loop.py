"""The self-improvement loop: collect groups, update on them, evaluate, promote or roll back.

Each round:
  1. collect: answer the next `tasks_per_round` tasks (K samples each, self-scored) and log the groups;
  2. update:  run the GRPO updater over every logged group no update has consumed yet;
  3. eval:    score the updated policy on held-out tasks (gold accuracy, or the label-free composite);
  4. gate:    promote the update when eval >= the promoted eval - margin (with min_gain_z > 0: when it beats
              the promoted eval by min_gain_z standard errors of the per-task differences, less the margin);
              otherwise restore the promoted adapter and record why. Either way the update and its groups are
              recorded in the store.

Everything lives in the run directory:
    store.sqlite          the trajectory store (groups, completions, updates)
    state.json            rounds done, the task cursor, the promoted version and its eval
    rounds.jsonl          one line per round (round 0: the baseline eval) - what `report` plots
    metrics.jsonl         the updater's per-step metrics
    checkpoints/          the updater's checkpoints (adapter, optimizer, consumed groups)
    promoted/<version>/   each promoted adapter; promoted.json names the current one (agents `follow` it)
A kill at any moment loses no logged group (each is one SQLite transaction) and a restart resumes from the
last checkpoint (steps since it are redone; with checkpoint_every = 1, none). The gate's decision is
journaled in state.json before it is applied, so a kill during the gate finishes it on restart instead of
re-deciding it. A kill during collection can log the batch being answered twice (extra groups, none lost).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from .agent import PROMOTED, GRPOAgent
from .config import LoopConfig, UpdateConfig
from .errors import LoopError
from .evaluation import evaluate, is_correct, monitors
from .scoring import blend_feedback, group_advantages
from .updater import GRPOUpdater, latest_checkpoint

BASE = "base"
MODES = ("grpo", "training-free")



def write_json_atomic(path: Path, data: dict) -> None:
    """Replace `path` with `data` as JSON in one step: a reader sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before it takes the name, so a power cut cannot leave it empty
    os.replace(tmp, path)


class SelfImprovementLoop:
    """Runs rounds of collect -> update -> eval -> gate for an agent, resumable from its run directory."""

    def __init__(self, agent: GRPOAgent, run_dir: str | os.PathLike, tasks: Sequence[dict],
                 eval_tasks: Sequence[dict], update: UpdateConfig | None = None, cfg: LoopConfig | None = None,
                 batch: int = 8, progress: bool = True, mode: str = "grpo", feedback_weight: float = 0.5):
        if mode not in MODES:
            raise LoopError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
        if mode == "training-free" and (agent.experience is None or agent.experience.policy is None):
            raise LoopError("training-free mode needs an agent with an ExperienceLibrary (with a model to learn lessons)")
        if agent.store is None or agent.scorer is None or agent.k < 2:
            raise LoopError("the loop needs an agent with a store, a scorer and k >= 2 (groups to learn from)")
        if not tasks:
            raise LoopError("no tasks to collect groups on: give a task file with at least one question")
        if not eval_tasks:
            raise LoopError("no held-out tasks to evaluate on: give an eval set (its questions are never trained on)")
        self.agent, self.tasks, self.cfg = agent, list(tasks), cfg or LoopConfig()
        self.eval_tasks = list(eval_tasks)[: self.cfg.eval_size or None]
        if self.cfg.min_gain_z and len(self.eval_tasks) < 2:
            raise LoopError(f"loop.min_gain_z = {self.cfg.min_gain_z} needs at least 2 eval tasks to estimate the "
                            f"noise of a gain (the eval set has {len(self.eval_tasks)}); add tasks, or set it to 0")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.batch, self.progress = batch, progress
        self.mode, self.feedback_weight = mode, feedback_weight
        self.update_cfg = update or UpdateConfig()
        self.updater = None
        if mode == "grpo":
            if not self.update_cfg.lora:
                raise LoopError("the loop promotes and rolls back LoRA adapters: set update.lora = true")
            self.updater = GRPOUpdater(agent.policy, self.update_cfg, output_dir=self.run_dir)
        self.state = self._load_state()
        if self.state.setdefault("mode", mode) != mode:
            raise LoopError(f"{self.run_dir} is a {self.state['mode']} run; continue it in that mode, or use a new "
                            "run directory")
        if not self._snapshot_path(BASE).exists():  # the zero adapter or the starting library: what base means
            self._snapshot(BASE)
        if self.updater is not None and latest_checkpoint(self.checkpoints):
            self.updater.resume(self.checkpoints)
        if self.updater is not None:
            self._load_reference()
        agent.policy.version = self.state["promoted_version"]

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def _load_state(self) -> dict:
        path = self.run_dir / "state.json"
        if not path.is_file():
            return {"round": 0, "cursor": 0, "promoted_version": BASE, "promoted_eval": None, "pending": None}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoopError(f"{path} is not readable JSON ({e}); restore it, or start a new run directory") from e

    def _eval_identity(self) -> dict:
        """What makes two evals comparable, task by task: the metric, the held-out questions, how the answers
        are drawn, and (label-free) how they are scored."""
        labelled = not self.cfg.label_free and all("answer" in t for t in self.eval_tasks)
        digest = hashlib.sha1(json.dumps([t["question"] for t in self.eval_tasks]).encode()).hexdigest()[:12]
        identity = {"metric": "accuracy" if labelled else "composite", "eval_tasks": digest}
        sampling = self.agent.sampling
        identity["sampling"] = {"max_new_tokens": sampling.max_new_tokens}  # the greedy eval's length cap too
        if not labelled:  # the composite depends on how the answers are sampled and scored
            identity["sampling"].update(eval_k=self.cfg.eval_k, temperature=sampling.temperature,
                                        top_p=sampling.top_p)
            s = self.agent.scorer
            setup = {"weights": s.weights, "gates": list(s.gates), "penalty": s.penalty}
            identity["scoring"] = hashlib.sha1(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:12]
        return identity

    def _save_state(self) -> None:
        write_json_atomic(self.run_dir / "state.json", self.state)

    def _append_round(self, row: dict) -> None:
        with (self.run_dir / "rounds.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def rounds(self) -> list[dict]:
        """Every round recorded so far (round 0 is the baseline)."""
        return read_jsonl(self.run_dir / "rounds.jsonl")

    # ----- the loop --------------------------------------------------------------------------------------
    def run(self, rounds: int) -> list[dict]:
        """Run rounds until `rounds` have been completed in this run directory; returns their rows."""
        identity = self._eval_identity()
        recorded = self.state.get("eval_identity", identity)  # runs from before a key existed compare on the rest
        if any(recorded[k] != identity.get(k) for k in recorded):
            raise LoopError(
                f"{self.run_dir} was gated on {self.state['eval_identity']} but this run evaluates {identity}: the "
                "evals would not compare. Use the same eval set and labels setting, or a new run directory")
        if self.cfg.min_gain_z and self.state["promoted_eval"] is not None and not self.state.get("promoted_values"):
            raise LoopError(NO_PAIRED_VALUES)  # before any work, not at the gate of a trained round
        if self.state.get("pending"):  # killed during the gate: finish it as decided
            self._finish_gate(self.state["pending"])
        if self.state["promoted_eval"] is None:
            t0 = time.perf_counter()
            result = self.evaluate()
            if not any(x["round"] == 0 for x in self.rounds()):
                self._append_round({"round": 0, "eval": result, "promoted": True, "policy_version": BASE,
                                    "reason": "baseline", "seconds": time.perf_counter() - t0})
            self.state.update(promoted_eval=result["value"], promoted_values=result.get("values"),
                              eval_identity=identity)
            self._best_monitors(result)
            self._save_state()
        rows = []
        while self.state["round"] < rounds:
            limit = self.cfg.stop_after_rollbacks
            if limit and self.state.get("rollbacks_in_a_row", 0) >= limit:
                self.state["stopped"] = f"guard stop_after_rollbacks: {limit} rollbacks in a row"
                self._save_state()
                break
            rows.append(self.run_round(self.state["round"] + 1))
        return rows

    def run_round(self, r: int) -> dict:
        t0 = time.perf_counter()
        self._reset_reference(r)
        self.collect(r)  # in training-free mode the library learns from each batch as it is collected
        groups = self.agent.store.groups(unconsumed=True, source="loop")
        if self.updater is not None:
            self.update(r, self._with_feedback(groups))
        result = self.evaluate()
        promoted, reason = gate(result, self.state["promoted_eval"], self.state.get("promoted_values"),
                                self.cfg.margin, self.cfg.min_gain_z)
        guards = self._guards(result)
        if guards:
            promoted, reason = False, "; ".join(guards) + ": rolled back"
        # The decision is journaled first: a kill from here on finishes this gate on restart, never redoes it.
        self.state["pending"] = {
            "round": r, "eval": result, "promoted": promoted, "reason": reason, "guards": guards,
            "version": f"r{r}" if promoted else self.state["promoted_version"],
            "group_ids": [g.group_id for g in groups], "seconds": time.perf_counter() - t0,
        }
        self._snapshot(f"r{r}", "promoted" if promoted else "rejected")  # rejected: kept to inspect, never served
        self._save_state()
        return self._finish_gate(self.state["pending"])

    def _load_reference(self) -> None:
        """The KL reference is what state.json names: the base, or the promoted snapshot it was reset to (read
        from that snapshot, whatever checkpoint was resumed). With reference_reset_every = 0 it is the base."""
        version = self.state.get("reference_version", BASE)
        if not self.cfg.reference_reset_every and version != BASE:
            self.state.update(reference_version=BASE, reference_round=None)
            self._save_state()
            version = BASE
        if version == BASE:
            self.updater.ref_adapter = None
        else:
            self.updater.reset_reference(self._snapshot_path(version))

    def _reset_reference(self, r: int) -> None:
        """Every reference_reset_every rounds, anchor the KL to the promoted policy (its snapshot) instead of
        the base; state.json names the reference, so a restart restores it."""
        every = self.cfg.reference_reset_every
        if self.updater is None or not every or r == 1 or (r - 1) % every or self.state.get("reference_round") == r:
            return
        self.updater.reset_reference(self._snapshot_path(self.state["promoted_version"]))
        self.state.update(reference_round=r, reference_version=self.state["promoted_version"])
        self._save_state()

    def _with_feedback(self, groups: list) -> list:
        """Blend clients' ratings (store.feedback) into the rated completions' composites and recompute the
        batch's advantages; groups nobody rated keep their scores."""
        composites, rated = [], 0
        for g in groups:
            comp = [c.composite if c.composite is not None else 0.0 for c in g.completions]
            ratings: dict[int, list[float]] = {}
            for f in self.agent.store.feedback(g.group_id):
                i = f["index"] if f["index"] is not None else max(range(len(comp)), key=lambda j: (comp[j], -j))
                ratings.setdefault(i, []).append(f["rating"])
            rated += bool(ratings)
            composites.append(blend_feedback(comp, {i: sum(v) / len(v) for i, v in ratings.items()},
                                             self.feedback_weight))
        if rated and self.feedback_weight > 0:
            advantages, flat = group_advantages(composites, self.agent.scorer.scale, self.agent.scorer.eps)
            for g, comp, adv, zero in zip(groups, composites, advantages, flat):
                g.zero_variance = zero
                for c, x, a in zip(g.completions, comp, adv):
                    c.composite, c.advantage = x, a
        return groups

    def _guards(self, result: dict) -> list[str]:
        """The collapse guards that fire on this round's eval (and its update's KL), each with its reason."""
        fired, cfg = [], self.cfg
        kl = self._last_kl()
        if cfg.max_kl and kl is not None and kl > cfg.max_kl:
            fired.append(f"guard max_kl: KL {kl:.4f} > {cfg.max_kl}")
        now, best = result.get("monitors") or {}, self.state.get("best_monitors") or {}
        for key, ratio, name in (("entropy", cfg.min_entropy_ratio, "min_entropy_ratio"),
                                 ("distinct_rate", cfg.min_distinct_ratio, "min_distinct_ratio"),
                                 ("answer_tokens", cfg.min_length_ratio, "min_length_ratio")):
            if ratio and now.get(key) is not None and best.get(key) and now[key] < ratio * best[key]:
                fired.append(f"guard {name}: {key} {now[key]:.3f} < {ratio} x best {best[key]:.3f}")
        return fired

    def _last_kl(self) -> float | None:
        steps = self._round_steps()
        return steps[-1]["kl"] if steps else None

    def _round_steps(self) -> list[dict]:
        """This round's optimizer steps from metrics.jsonl, once each (a step redone after a resume is logged
        twice: the later entry counts), so a resumed update reports all its steps."""
        start = self.state.get("update_from_step") or 0
        steps = {m["step"]: m for m in read_jsonl(self.run_dir / "metrics.jsonl") if m["step"] > start}
        return [steps[k] for k in sorted(steps)]

    def _best_monitors(self, result: dict) -> None:
        """Remember the highest entropy, distinct-answer rate and answer length of any promoted policy (the
        guards' yardstick)."""
        best = self.state.setdefault("best_monitors", {})
        for key, value in (result.get("monitors") or {}).items():
            if value is not None and (best.get(key) is None or value > best[key]):
                best[key] = value

    def update(self, r: int, groups) -> None:
        """Train on the round's groups, checkpointing every `checkpoint_every` steps."""
        if self.state.get("update_from_step") is None:  # the step this round's update starts after
            self.state["update_from_step"] = self.updater.step
            self._save_state()
        train_with_checkpoints(self.updater, groups, self.checkpoints, self.cfg.checkpoint_every,
                               desc=f"round {r} update", progress=self.progress)

    def _finish_gate(self, pending: dict) -> dict:
        """Apply a journaled gate decision; every step is safe to repeat after a kill."""
        r, version, promoted = pending["round"], pending["version"], pending["promoted"]
        metrics = self._round_metrics(pending["group_ids"])  # what this round learned, before any rollback
        if not promoted:
            self._restore(version)
        pointer = self._snapshot_path(version).relative_to(self.run_dir)
        write_json_atomic(self.run_dir / PROMOTED,
                          {"version": version, ("adapter" if self.mode == "grpo" else "lessons"): str(pointer)})
        self.agent.policy.version = version
        if not any(u["round"] == r for u in self.agent.store.updates()):
            self.agent.store.record_update(
                round=r, policy_version=version, group_ids=pending["group_ids"], metrics=metrics,
                eval=pending["eval"], promoted=promoted, reason=pending["reason"],
                checkpoint=str(self._snapshot_path(f"r{r}", "promoted" if promoted else "rejected")))
        if self.updater is not None:
            self.updater.save_checkpoint(self.checkpoints)  # the post-gate weights: what a restart resumes from
        row = {"round": r, **metrics, "eval": pending["eval"], "promoted": promoted, "policy_version": version,
               "reason": pending["reason"], "guards": pending.get("guards", []), "seconds": pending["seconds"],
               "reference": self.state.get("reference_version", BASE)}
        if not any(x["round"] == r for x in self.rounds()):
            self._append_round(row)
        if promoted:
            self.state.update(promoted_eval=pending["eval"]["value"],
                              promoted_values=pending["eval"].get("values"))
            self._best_monitors(pending["eval"])
        self.state["rollbacks_in_a_row"] = 0 if promoted else self.state.get("rollbacks_in_a_row", 0) + 1
        self.state.update(round=r, promoted_version=version, pending=None, update_from_step=None)
        self._save_state()
        return row

    def _round_metrics(self, group_ids: list[str]) -> dict:
        """The round's update in a few numbers (its steps from metrics.jsonl) and its groups' monitors."""
        groups = [self.agent.store.get_group(gid) for gid in group_ids]
        metrics = _summarise(self._round_steps(), groups)
        metrics.update(self._gold_agreement(group_ids, groups))
        if self.mode == "training-free":
            library = self.agent.experience
            metrics.update(lessons=len(library.lessons()), library_ops=dict(library.stats))
        return metrics

    def _gold_agreement(self, group_ids: list[str], groups: list) -> dict:
        """Where the round's tasks carry gold answers (never used to learn): how often the answer the composite
        ranks first is right (top_correct_rate), against the share of all sampled answers that are right."""
        gold = {t["id"]: t for t in self.tasks if "answer" in t and "id" in t}
        if not gold:  # nothing to compare with: no need to read the groups' task ids
            return {}
        labelled = top = right = n = 0
        for gid, g in zip(group_ids, groups):
            task = gold.get(self.agent.store.group_info(gid)["task_id"])
            if task is None or not g.completions:
                continue
            ok = [is_correct(c.text, task["answer"], task.get("aliases", ())) for c in g.completions]
            best = max(range(len(ok)), key=lambda i: (g.completions[i].composite or 0.0, -i))
            labelled, top, right, n = labelled + 1, top + ok[best], right + sum(ok), n + len(ok)
        if not labelled:
            return {}
        return {"labelled_groups": labelled, "top_correct_rate": top / labelled, "sample_correct_rate": right / n}

    def collect(self, r: int) -> None:
        """Answer this round's tasks (resuming at the task cursor) and log their groups."""
        end = r * self.cfg.tasks_per_round  # the cursor where this round's collection is complete
        bar = tqdm(total=self.cfg.tasks_per_round, initial=self.cfg.tasks_per_round - (end - self.state["cursor"]),
                   desc=f"round {r} collect", unit="task", disable=not self.progress, leave=False)
        while self.state["cursor"] < end:
            n = min(self.batch, end - self.state["cursor"])
            chunk = [self.tasks[(self.state["cursor"] + i) % len(self.tasks)] for i in range(n)]
            self.agent.respond_batch([t["question"] for t in chunk], [t.get("id") for t in chunk],
                                     source="loop", meta={"round": r}, learn=self.mode == "training-free")
            self.state["cursor"] += n
            self._save_state()
            bar.update(n)
        bar.close()

    def evaluate(self) -> dict:
        return evaluate(self.agent, self.eval_tasks, label_free=self.cfg.label_free, k=self.cfg.eval_k,
                        batch=self.batch, progress=self.progress)

    # ----- what is promoted: a LoRA adapter (grpo) or the lesson library (training-free) --------------------
    def _snapshot_path(self, version: str, folder: str = "promoted") -> Path:
        name = version if self.mode == "grpo" else f"{version}.lessons.json"
        return self.run_dir / folder / name

    def _snapshot(self, version: str, folder: str = "promoted") -> None:
        path = self._snapshot_path(version, folder)
        if self.mode == "grpo":
            save_adapter(self.updater.model, path)
        else:
            tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.json")
            self.agent.experience.export(tmp)
            os.replace(tmp, path)

    def _restore(self, version: str) -> None:
        """Bring back the promoted adapter (and drop the optimizer's moments, which belong to the discarded
        weights) or the promoted library."""
        if self.mode == "grpo":
            self.agent.policy.load_adapter(self._snapshot_path(version), version=version)
            self.updater.optimizer.state.clear()
        else:
            self.agent.experience.load(self._snapshot_path(version))


NO_PAIRED_VALUES = ("loop.min_gain_z compares two evals task by task, but this run directory's promoted eval has no "
                    "per-task scores (it was started before min_gain_z existed); set loop.min_gain_z = 0 for it, "
                    "or start a new run directory")


def gate(result: dict, before: float, before_values: Sequence[float] | None, margin: float = 0.0,
         min_gain_z: float = 0.0) -> tuple[bool, str]:
    """Promote or roll back an update from its eval `result` against the promoted policy's eval (`before`, and
    its per-task `before_values`): promote when the gain is at least min_gain_z standard errors of the paired
    per-task differences, less `margin`. With min_gain_z = 0 that is eval >= before - margin. Returns (promote,
    reason)."""
    value = result["value"]
    if not min_gain_z:
        if value >= before - margin:
            return True, f"eval {value:.4f} >= promoted {before:.4f} - margin {margin}"
        return False, f"eval {value:.4f} < promoted {before:.4f} - margin {margin}: rolled back"
    values = result.get("values")
    if not values or not before_values or len(values) != len(before_values):
        raise LoopError(NO_PAIRED_VALUES)
    diffs = [a - b for a, b in zip(values, before_values)]  # the same tasks, the same sampler seeds: paired
    gain = math.fsum(diffs) / len(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    said = f"eval {value:.4f} - promoted {before:.4f} = {gain:+.4f}"
    # 1e-9: a gain exactly on the threshold (one question more right, z = 1, on 0/1 scores) is not left to rounding
    if gain >= min_gain_z * se - margin - 1e-9:
        return True, f"{said} >= {min_gain_z} x SE {se:.4f} - margin {margin}"
    return False, f"{said} < {min_gain_z} x SE {se:.4f} - margin {margin}: rolled back"


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSON-lines file the loop wrote (none when it does not exist yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_with_checkpoints(updater: GRPOUpdater, groups, directory: Path, every: int = 1, desc: str = "update",
                           progress: bool = True) -> list[dict]:
    """updater.train with a progress bar, a checkpoint every `every` steps and one after the last step."""
    bar = tqdm(total=None, desc=desc, unit="step", disable=not progress, leave=False)

    def on_step(m: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", kl=f"{m['kl']:.4f}")
        if updater.step % every == 0:
            updater.save_checkpoint(directory)

    history = updater.train(groups, on_step=on_step)
    bar.close()
    if history and updater.step % every:
        updater.save_checkpoint(directory)
    return history


def save_adapter(model, directory: Path) -> None:
    """Write a peft model's adapter to `directory` atomically (a temporary directory, then renamed)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    aside = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        directory.rename(aside)
    tmp.rename(directory)
    shutil.rmtree(aside, ignore_errors=True)


def _summarise(history: list[dict], groups) -> dict:
    """A round's update in a few numbers (steps, loss, KL) and the monitors of its groups."""
    mean = lambda key: sum(m[key] for m in history) / len(history) if history else None  # noqa: E731
    return {
        "steps": len(history), "loss": mean("loss"), "kl": mean("kl"),
        "kl_last": history[-1]["kl"] if history else None, "clip_fraction": mean("clip_fraction"),
        "grad_norm": mean("grad_norm"), "skipped_nonfinite": sum(bool(m["skipped_nonfinite"]) for m in history),
        **monitors(groups),
    }
