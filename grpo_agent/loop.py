"""The self-improvement loop: collect groups, update on them, evaluate, promote or roll back.

Each round:
  1. collect: answer the next `tasks_per_round` tasks (K samples each, self-scored) and log the groups;
  2. update:  blend in clients' ratings (SelfScorer.rescore, the result written back to the store), then run
              the GRPO updater over every logged group no update has consumed yet;
  3. eval:    score the updated policy on held-out tasks (gold accuracy, or the label-free composite);
  4. gate:    promote the update when eval >= the promoted eval - margin (with min_gain_z > 0: when it beats
              the promoted eval by min_gain_z standard errors of the per-task differences, less the margin);
              otherwise restore the promoted adapter and record why. Either way the update and its groups are
              recorded in the store.

Everything lives in the run directory (rundir.py names its files). A kill at any moment loses no logged
group (each is one SQLite transaction) and a restart resumes from the last checkpoint (steps since it are
redone; with checkpoint_every = 1, none). The gate's decision is journaled in state.json before it is
applied, so a kill during the gate finishes it on restart instead of re-deciding it. A kill during
collection loses nothing and logs nothing twice: each group's id is made from the run and its place in the
task stream, and a batch answered again after a restart writes only the groups the killed run had not.
Collection runs in this process or on rollout workers (rollout/workers.py, Ray), which return the groups
for this process to log; with loop.max_staleness >= 1 the workers collect the next round while this one
updates, evaluates and gates, and the update trains on groups sampled up to max_staleness promotions back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
import uuid
from typing import TYPE_CHECKING, Sequence

from tqdm import tqdm

from .agent import GRPOAgent
from .config import LoopConfig, UpdateConfig, check_loop_settings
from .errors import ContextLengthError, LoopError
from .evaluation import evaluate, is_correct, monitors
from .records import Group
from .redteam import mix, paraphrase, practice_tasks, safety_rates
from .rollout.workers import Ahead, Chunk
from .rundir import BASE, EvalResult, LoopState, PendingGate, Promoted, RunDir
from .tasks import corpus_answer
from .update_job import run_update
from .updater import GRPOUpdater, latest_checkpoint, train_with_checkpoints

if TYPE_CHECKING:
    from .rollout.workers import RolloutWorkers


class SelfImprovementLoop:
    """Runs rounds of collect -> update -> eval -> gate for an agent, resumable from its run directory.

    Its settings are `cfg` (loop.mode among them) and `update`; the feedback weight is the scorer's
    (scoring.feedback_weight)."""

    def __init__(self, agent: GRPOAgent, run_dir: str | os.PathLike, tasks: Sequence[dict],
                 eval_tasks: Sequence[dict], update: UpdateConfig | None = None, cfg: LoopConfig | None = None,
                 batch: int = 8, progress: bool = True, workers: "RolloutWorkers | None" = None):
        self.cfg, self.update_cfg = cfg or LoopConfig(), update or UpdateConfig()
        check_loop_settings(self.cfg, self.update_cfg)
        self.mode = self.cfg.mode
        if self.mode == "training-free" and (agent.experience is None or agent.experience.policy is None):
            raise LoopError("training-free mode needs an agent with an ExperienceLibrary (with a model to learn lessons)")
        if agent.store is None or agent.scorer is None or agent.k < 2:
            raise LoopError("the loop needs an agent with a store, a scorer and k >= 2 (groups to learn from)")
        if self.cfg.unit == "episode" and agent.episodes.explore >= agent.k:
            raise LoopError(f"episodes.explore = {agent.episodes.explore} makes every episode of a group search first: "
                            f"keep it below sampling.k = {agent.k}, so the others still choose")
        if not tasks:
            raise LoopError("no tasks to collect groups on: give a task file with at least one question")
        if not eval_tasks:
            raise LoopError("no held-out tasks to evaluate on: give an eval set (its questions are never trained on)")
        self.agent, self.tasks = agent, list(tasks)
        self.eval_tasks = list(eval_tasks)[: self.cfg.eval_size or None]
        if self.cfg.min_gain_z and len(self.eval_tasks) < 2:
            raise LoopError(f"loop.min_gain_z = {self.cfg.min_gain_z} needs at least 2 eval tasks to estimate the "
                            f"noise of a gain (the eval set has {len(self.eval_tasks)}); add tasks, or set it to 0")
        self.detector = agent.guard.detector if agent.guard is not None else agent.scorer.detector  # or None
        if self.cfg.redteam_share:
            self.tasks = self._with_redteam(self.tasks)
        if self.cfg.unit == "episode" and self.mode != "grpo":
            raise LoopError('loop.unit = "episode" trains on episodes with GRPO; the training-free mode learns '
                            'lessons from single answers: use loop.unit = "answer" with it')
        fits = agent.episode_runner().check_fits if self.cfg.unit == "episode" else agent.check_fits
        for name, pool in (("task", self.tasks), ("eval task", self.eval_tasks)):  # refused up front, not mid-run
            try:
                fits([t["question"] for t in pool])
            except ContextLengthError as e:
                raise LoopError(f"{name} {pool[e.index].get('id', e.index)} does not fit the model's context ({e}); "
                                "shorten it or remove it from the task file") from e
        self.dir = RunDir(run_dir)
        self.dir.path.mkdir(parents=True, exist_ok=True)
        self.batch, self.progress = batch, progress
        self.workers = workers  # rollout workers on Ray (each follows the run directory), or None: in-process
        self._ahead: Ahead | None = None  # the next round's collection, started during this one (max_staleness)
        self._target = 0  # the round run() is to complete
        if workers is not None and self.mode != "grpo":
            raise LoopError("rollout workers sample from the promoted adapter; a training-free loop learns lessons "
                            "from each batch as it goes, in one process: collect without workers")
        if workers is not None:
            workers.follow(self.dir.path)
        self.kind = "adapter" if self.mode == "grpo" else "lessons"  # what a round promotes
        self.updater = None
        if self.mode == "grpo":
            self.updater = GRPOUpdater(agent.policy, self.update_cfg, output_dir=self.dir.path)
        self.state = self.dir.read_state() or LoopState(mode=self.mode)
        if not self.state.run_id:  # kept in state.json, so a moved run directory keeps its group ids
            self.state.run_id = uuid.uuid4().hex[:12]
        if self.state.mode != self.mode:
            raise LoopError(f"{self.dir.path} is a {self.state.mode} run; continue it in that mode, or use a new "
                            "run directory")
        if not self.dir.snapshot(BASE, self.kind).exists():  # the zero adapter or the starting library
            self._snapshot(BASE)
        if self.updater is not None:
            if latest_checkpoint(self.dir.checkpoints):
                self.updater.resume(self.dir.checkpoints)
            self._load_reference()
        agent.policy.version = self.state.promoted_version
        self._publish(self.state.promoted_version)  # a resumed run's remote engine serves what was promoted

    def _with_redteam(self, tasks: list[dict]) -> list[dict]:
        """The task pool with red-team tasks mixed in at loop.redteam_share (made from the safety rules and the
        species of the agent's fact index)."""
        if self.detector is None:
            raise LoopError("loop.redteam_share makes red-team tasks from the safety rules: give the agent a scorer "
                            "with the safety or alignment signal (the default config's safety gate has them)")
        index = self.agent.retriever
        passages = index.passages() if index is not None and hasattr(index, "passages") else []
        species = sorted({p.metadata.get("species") for p in passages} - {None})
        red = practice_tasks(self.detector, species, self.cfg.redteam_tasks, seed=self.update_cfg.seed,
                             benign_share=self.cfg.redteam_benign_share)
        if self.cfg.redteam_paraphrase:
            red = paraphrase(red, self.agent.policy, self.detector)
        return mix(tasks, red, self.cfg.redteam_share)

    def _save_state(self) -> None:
        self.dir.write_state(self.state)

    def rounds(self) -> list[dict]:
        """Every round recorded so far (round 0 is the baseline)."""
        return self.dir.rounds()

    def _eval_identity(self) -> dict:
        """What makes two evals comparable, task by task: the metric, the held-out questions, how the answers
        are drawn, and (label-free) how they are scored."""
        labelled = not self.cfg.label_free and all("answer" in t for t in self.eval_tasks)
        digest = hashlib.sha1(json.dumps([t["question"] for t in self.eval_tasks]).encode()).hexdigest()[:12]
        identity = {"metric": "accuracy" if labelled else "composite", "eval_tasks": digest}
        sampling = self.agent.sampling
        identity["sampling"] = {"max_new_tokens": sampling.max_new_tokens}  # the greedy eval's length cap too
        identity["unit"] = self.cfg.unit  # answers, or episodes with the search tool
        if not labelled:  # the composite depends on how the answers are sampled and scored
            identity["sampling"].update(eval_k=self.cfg.eval_k, temperature=sampling.temperature,
                                        top_p=sampling.top_p)
            s = self.agent.scorer
            setup = {"weights": s.weights, "gates": list(s.gates), "penalty": s.penalty}
            identity["scoring"] = hashlib.sha1(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:12]
        return identity

    # ----- the loop --------------------------------------------------------------------------------------
    def run(self, rounds: int) -> list[dict]:
        """Run rounds until `rounds` have been completed in this run directory; returns their rows."""
        identity = self._eval_identity()
        recorded = self.state.eval_identity or identity  # runs from before a key existed compare on the rest
        recorded = {"unit": "answer", **recorded}  # (runs from before episodes answered)
        if any(recorded[k] != identity.get(k) for k in recorded):
            raise LoopError(
                f"{self.dir.path} was gated on {recorded} but this run evaluates {identity}: the evals would not "
                "compare. Use the same eval set and labels setting, or a new run directory")
        if self.cfg.min_gain_z and self.state.promoted_eval is not None and not self.state.promoted_values:
            raise LoopError(NO_PAIRED_VALUES)  # before any work, not at the gate of a trained round
        if self.state.pending:  # killed during the gate: finish it as decided
            self._finish_gate(self.state.pending)
        if self.state.promoted_eval is None:
            t0 = time.perf_counter()
            result = self.evaluate()
            if not any(x["round"] == 0 for x in self.rounds()):
                self.dir.append_round({"round": 0, "eval": result.to_dict(), "promoted": True, "policy_version": BASE,
                                       "reason": "baseline", "seconds": time.perf_counter() - t0})
            self.state.promoted_eval, self.state.promoted_values = result.value, result.values
            self.state.eval_identity = identity
            self._best_monitors(result)
            self._save_state()
        rows, self._target = [], rounds
        try:
            while self.state.round < rounds:
                limit = self.cfg.stop_after_rollbacks
                if limit and self.state.rollbacks_in_a_row >= limit:
                    self.state.stopped = f"guard stop_after_rollbacks: {limit} rollbacks in a row"
                    self._save_state()
                    break
                rows.append(self.run_round(self.state.round + 1))
        finally:  # a collection started ahead for a round this run does not reach: stopped, nothing logged
            if self._ahead is not None:
                self._ahead, ahead = None, self._ahead
                ahead.cancel()
        return rows

    def run_round(self, r: int) -> dict:
        t0 = time.perf_counter()
        self._reset_reference(r)
        self.collect(r)  # in training-free mode the library learns from each batch as it is collected
        self._collect_ahead(r + 1)
        store = self.agent.store
        groups = store.groups(unconsumed=True, source="loop")  # with their info: read once for the round
        # Groups sampled too many promotions back are consumed untrained (their old policy is too far off).
        promotions = self.promotions()
        stale = {g.group_id for g in groups if staleness(g.policy_version, promotions) > self.cfg.max_staleness}
        fresh = [g for g in groups if g.group_id not in stale]
        if self.updater is not None:
            # Once per round: after a restart the store already holds the blended scores, which must not blend twice.
            if self.state.rescored_round != r:
                if self.agent.scorer.rescore(fresh, store.feedback_for([g.group_id for g in fresh])):
                    store.record_scores(fresh)  # the store keeps the advantages the update trains on
                self.state.rescored_round = r
                self._save_state()
            self.update(r, fresh)
        result = self.evaluate()
        promoted, reason = gate(result, self.state.promoted_eval, self.state.promoted_values,
                                self.cfg.margin, self.cfg.min_gain_z)
        guards = self._guards(result)
        if guards:
            promoted, reason = False, "; ".join(guards) + ": rolled back"
        # The decision is journaled first: a kill from here on finishes this gate on restart, never redoes it.
        self.state.pending = PendingGate(
            round=r, eval=result, promoted=promoted, reason=reason, guards=guards,
            version=f"r{r}" if promoted else self.state.promoted_version,
            group_ids=[g.group_id for g in groups], stale=sorted(stale), seconds=time.perf_counter() - t0)
        self._snapshot(f"r{r}", "promoted" if promoted else "rejected")  # rejected: kept to inspect, never served
        self._save_state()
        return self._finish_gate(self.state.pending, groups)

    def _load_reference(self) -> None:
        """The KL reference is what state.json names: the base, or the promoted snapshot it was reset to (read
        from that snapshot, whatever checkpoint was resumed). With reference_reset_every = 0 it is the base."""
        if not self.cfg.reference_reset_every and self.state.reference_version != BASE:
            self.state.reference_version, self.state.reference_round = BASE, None
            self._save_state()
        if self.state.reference_version == BASE:
            self.updater.ref_adapter = None
        else:
            self.updater.reset_reference(self.dir.snapshot(self.state.reference_version, self.kind))

    def _reset_reference(self, r: int) -> None:
        """Every reference_reset_every rounds, anchor the KL to the promoted policy (its snapshot) instead of
        the base; state.json names the reference, so a restart restores it."""
        every = self.cfg.reference_reset_every
        if self.updater is None or not every or r == 1 or (r - 1) % every or self.state.reference_round == r:
            return
        self.updater.reset_reference(self.dir.snapshot(self.state.promoted_version, self.kind))
        self.state.reference_round, self.state.reference_version = r, self.state.promoted_version
        self._save_state()

    def _guards(self, result: EvalResult) -> list[str]:
        """The collapse guards that fire on this round's eval (and its update's KL), each with its reason."""
        fired, cfg = [], self.cfg
        steps = self._round_steps()
        kl = steps[-1]["kl"] if steps else None
        if cfg.max_kl and kl is not None and kl > cfg.max_kl:
            fired.append(f"guard max_kl: KL {kl:.4f} > {cfg.max_kl}")
        now, best = result.monitors or {}, self.state.best_monitors
        for key, ratio, name in (("entropy", cfg.min_entropy_ratio, "min_entropy_ratio"),
                                 ("distinct_rate", cfg.min_distinct_ratio, "min_distinct_ratio"),
                                 ("answer_tokens", cfg.min_length_ratio, "min_length_ratio")):
            if ratio and now.get(key) is not None and best.get(key) and now[key] < ratio * best[key]:
                fired.append(f"guard {name}: {key} {now[key]:.3f} < {ratio} x best {best[key]:.3f}")
        return fired

    def _round_steps(self) -> list[dict]:
        """This round's optimizer steps from metrics.jsonl, once each (a step redone after a resume is logged
        twice: the later entry counts), so a resumed update reports all its steps."""
        start = self.state.update_from_step or 0
        steps = {m["step"]: m for m in self.dir.steps() if m["step"] > start}
        return [steps[k] for k in sorted(steps)]

    def _best_monitors(self, result: EvalResult) -> None:
        """Remember the highest entropy, distinct-answer rate and answer length of any promoted policy (the
        guards' yardstick)."""
        best = self.state.best_monitors
        for key, value in (result.monitors or {}).items():
            if value is not None and (best.get(key) is None or value > best[key]):
                best[key] = value

    def update(self, r: int, groups: Sequence[Group]) -> None:
        """Train on the round's groups, checkpointing every `checkpoint_every` steps: in this process, or
        (update.processes > 1) under torchrun, from the weights this process holds to the checkpoint it then
        resumes from."""
        if self.state.update_from_step is None:  # the step this round's update starts after
            self.state.update_from_step = self.updater.step
            self._save_state()
        if self.update_cfg.processes == 1:
            train_with_checkpoints(self.updater, groups, self.dir.checkpoints, self.cfg.checkpoint_every,
                                   desc=f"round {r} update", progress=self.progress)
            return
        if self.agent.config is None:
            raise LoopError("update.processes > 1 runs the update in new processes, which load the policy from the "
                            "agent's config: build the agent with GRPOAgent.from_config")
        self.updater.save_checkpoint(self.dir.checkpoints)  # what the processes start from
        reference = (None if self.state.reference_version == BASE
                     else str(self.dir.snapshot(self.state.reference_version, self.kind)))
        run_update(self.dir.path, self.agent.store.path, self.dir.checkpoints,
                   dataclasses.asdict(self.agent.config.policy), dataclasses.asdict(self.update_cfg),
                   [g.group_id for g in groups], reference, self.cfg.checkpoint_every, self.update_cfg.processes)
        self.updater.resume(self.dir.checkpoints)

    def _finish_gate(self, pending: PendingGate, groups: Sequence[Group] | None = None) -> dict:
        """Apply a journaled gate decision; every step is safe to repeat after a kill. `groups` are the round's
        (read again from the store when the gate is finished after a restart)."""
        r, version, promoted, store = pending.round, pending.version, pending.promoted, self.agent.store
        if groups is None:
            groups = store.groups(ids=pending.group_ids)
            if len(groups) != len(pending.group_ids):
                missing = len(pending.group_ids) - len(groups)
                raise LoopError(f"{self.dir.store} lacks {missing} of the groups round {r} trained on; restore the "
                                "store, or start a new run directory")
        stale = set(pending.stale)
        metrics = self._round_metrics([g for g in groups if g.group_id not in stale])  # before any rollback
        metrics["stale_groups"] = len(stale)
        if not promoted:
            self._restore(version)
        pointer = self.dir.snapshot(version, self.kind).relative_to(self.dir.path)
        self.dir.write_promoted(Promoted(version, self.kind, str(pointer)))
        self.agent.policy.version = version
        self._publish(version)
        if not any(u.round == r for u in store.updates()):
            store.record_update(
                round=r, policy_version=version, group_ids=pending.group_ids, metrics=metrics,
                eval=pending.eval.to_dict(), promoted=promoted, reason=pending.reason,
                checkpoint=str(self.dir.snapshot(f"r{r}", self.kind, "promoted" if promoted else "rejected")))
        if self.updater is not None:
            self.updater.save_checkpoint(self.dir.checkpoints)  # the post-gate weights: what a restart resumes from
        row = {"round": r, **metrics, "eval": pending.eval.to_dict(), "promoted": promoted, "policy_version": version,
               "reason": pending.reason, "guards": pending.guards, "seconds": pending.seconds,
               "reference": self.state.reference_version}
        if not any(x["round"] == r for x in self.rounds()):
            self.dir.append_round(row)
        if promoted:
            self.state.promoted_eval, self.state.promoted_values = pending.eval.value, pending.eval.values
            self._best_monitors(pending.eval)
        self.state.rollbacks_in_a_row = 0 if promoted else self.state.rollbacks_in_a_row + 1
        self.state.round, self.state.promoted_version = r, version
        self.state.pending, self.state.update_from_step = None, None
        self._save_state()
        return row

    def _round_metrics(self, groups: Sequence[Group]) -> dict:
        """The round's update in a few numbers (its steps from metrics.jsonl) and its groups' monitors."""
        metrics = _summarise(self._round_steps(), groups)
        metrics.update(self._gold_agreement(groups))
        if self.detector is not None:  # harmful answers to red-team tasks, refusals of the others
            metrics.update(safety_rates(groups, self.detector))
        if self.mode == "training-free":
            library = self.agent.experience
            metrics.update(lessons=len(library.lessons()), library_ops=dict(library.stats))
        return metrics

    def _gold_agreement(self, groups: Sequence[Group]) -> dict:
        """Where the round's tasks carry gold answers (never used to learn): how often the answer the composite
        ranks first is right (top_correct_rate), against the share of all sampled answers that are right."""
        gold = {t["id"]: t for t in self.tasks if "answer" in t and "id" in t}
        labelled = top = right = n = 0
        for g in groups:
            task = gold.get(g.info.task_id) if gold and g.info else None
            sampled = g.sampled  # the policy's own answers, not a guard's safe completion
            if task is None or not sampled:
                continue
            ok = [is_correct(c.text, task["answer"], task.get("aliases", ())) for c in sampled]
            best = max(range(len(ok)), key=lambda i: (sampled[i].composite or 0.0, -i))
            labelled, top, right, n = labelled + 1, top + ok[best], right + sum(ok), n + len(ok)
        if not labelled:
            return {}
        return {"labelled_groups": labelled, "top_correct_rate": top / labelled, "sample_correct_rate": right / n}

    def _chunks(self, r: int) -> list[Chunk]:
        """Round r's tasks from the task cursor on, in batches (chunks), each with a seed made from
        sampling.seed and its place in the task stream, so it gets the same groups wherever it is answered."""
        end, seed, chunks = r * self.cfg.tasks_per_round, self.agent.sampling.seed, []
        for start in range(self.state.cursor, end, self.batch):
            tasks = [self.tasks[i % len(self.tasks)] for i in range(start, min(start + self.batch, end))]
            chunks.append(Chunk(start, [t["question"] for t in tasks], [t.get("id") for t in tasks],
                                [corpus_answer(t) for t in tasks],
                                None if seed is None else (seed * 1_000_003 + start) % 2**31, {"round": r},
                                self.cfg.unit))
        return chunks

    def collect(self, r: int) -> None:
        """Answer this round's tasks (resuming at the task cursor) and log their groups: in this process, or
        on the rollout workers, which may have started on them during the last round (max_staleness >= 1)."""
        end = r * self.cfg.tasks_per_round  # the cursor where this round's collection is complete
        bar = tqdm(total=self.cfg.tasks_per_round, initial=self.cfg.tasks_per_round - (end - self.state.cursor),
                   desc=f"round {r} collect", unit="task", disable=not self.progress, leave=False)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and (ahead.round != r or ahead.start != self.state.cursor):
            ahead.cancel()  # not this round's: its workers are needed below
        elif ahead is not None:
            for chunk, entries in ahead:
                self._log(chunk, entries, bar)
        if self.workers is not None:
            for chunk, entries in self.workers.answer(self._chunks(r)):  # in order, while the workers answer the rest
                self._log(chunk, entries, bar)
        else:
            agent = self.agent
            for chunk in self._chunks(r):
                answered = agent.answered(self.cfg.unit, chunk.questions, chunk.references, seed=chunk.seed)
                learn = None
                if self.mode == "training-free" and all(s is not None for s in answered.scored):
                    learn = lambda a=answered: agent.experience.learn(a.groups, a.contexts, a.scored)  # noqa: E731
                self._log(chunk, agent.group_logs(chunk.questions, answered, chunk.task_ids, chunk.references,
                                                  chunk.meta), bar, learn)
        bar.close()
        if self.state.cursor != end:
            raise LoopError(f"round {r}'s collection stopped at task {self.state.cursor} of {end}; rerun to resume")

    def _collect_ahead(self, r: int) -> None:
        """With rollout workers and max_staleness >= 1: start round r's collection now, in the background, while
        this process updates, evaluates and gates the round before (each chunk is sampled from what is promoted
        when a worker takes it; its groups record that version)."""
        if self.workers is not None and self.cfg.max_staleness >= 1 and r <= self._target:
            self._ahead = Ahead(self.workers, self._chunks(r), r)

    def promotions(self) -> dict[str, int]:
        """Each version this run has promoted (the base first), with the round that promoted it."""
        return {BASE: 0, **{x["policy_version"]: x["round"] for x in self.rounds() if x["promoted"] and x["round"]}}

    def _log(self, chunk: Chunk, entries: list[dict | None], bar: tqdm, learn=None) -> None:
        """Write a chunk's groups, each under an id made from the run and its place in the task stream (a chunk
        answered again after a kill writes only what the killed run did not), then move the cursor past it.
        `learn` (training-free) runs between the two: a kill before the lessons are stored answers the chunk again
        and learns from it then, so no batch's lessons are lost (a kill in the moment between storing them and
        moving the cursor learns that batch twice; a repeated lesson is caught as a near-duplicate)."""
        ids = [f"{self.state.run_id}-{chunk.start + i:07d}" for i in range(len(entries))]
        logged = self.agent.store.logged(ids)
        for group_id, entry in zip(ids, entries):
            if entry is not None and group_id not in logged:
                entry["group"].group_id = group_id
                self.agent.store.log_group(**entry, config_hash=self.agent.config_hash, source="loop")
        if learn is not None:
            learn()
        self.state.cursor = chunk.start + len(entries)
        self._save_state()
        bar.update(len(entries))

    def evaluate(self) -> EvalResult:
        """The held-out eval, in-process: the weights the gate judges exist only there until promoted."""
        engine, self.agent.engine = self.agent.engine, self.agent.policy
        try:
            return evaluate(self.agent, self.eval_tasks, label_free=self.cfg.label_free, k=self.cfg.eval_k,
                            batch=self.batch, progress=self.progress, unit=self.cfg.unit)
        finally:
            self.agent.engine = engine

    # ----- what is promoted: a LoRA adapter (grpo) or the lesson library (training-free) --------------------
    def _snapshot(self, version: str, folder: str = "promoted") -> None:
        path = self.dir.snapshot(version, self.kind, folder)
        if self.updater is not None:
            self.updater.save_adapter(path)
        else:
            self.agent.experience.export(path)

    def _publish(self, version: str) -> None:
        """Serve the promoted adapter on a remote rollout engine, so the next round samples from it (training-
        free: the lessons are in the prompt, so only the version it records changes)."""
        engine = self.agent.engine
        if engine is self.agent.policy or engine.version == version:
            return  # (rollout workers follow the run directory and load it into their own engines)
        if self.updater is not None:
            engine.load_adapter(self.dir.snapshot(version, self.kind), version=version)
        else:
            engine.version = version

    def _restore(self, version: str) -> None:
        """Bring back the promoted adapter (and drop the optimizer's moments, which belong to the discarded
        weights) or the promoted library."""
        if self.updater is not None:
            self.agent.policy.load_adapter(self.dir.snapshot(version, self.kind), version=version)
            self.updater.optimizer.state.clear()
        else:
            self.agent.experience.load(self.dir.snapshot(version, self.kind))


NO_PAIRED_VALUES = ("loop.min_gain_z compares two evals task by task, but this run directory's promoted eval has no "
                    "per-task scores (it was started before min_gain_z existed); set loop.min_gain_z = 0 for it, "
                    "or start a new run directory")


def gate(result: EvalResult, before: float, before_values: Sequence[float] | None, margin: float = 0.0,
         min_gain_z: float = 0.0) -> tuple[bool, str]:
    """Promote or roll back an update from its eval `result` against the promoted policy's eval (`before`, and
    its per-task `before_values`): promote when the gain is at least min_gain_z standard errors of the paired
    per-task differences, less `margin`. With min_gain_z = 0 that is eval >= before - margin. Returns (promote,
    reason)."""
    value = result.value
    if not min_gain_z:
        if value >= before - margin:
            return True, f"eval {value:.4f} >= promoted {before:.4f} - margin {margin}"
        return False, f"eval {value:.4f} < promoted {before:.4f} - margin {margin}: rolled back"
    values = result.values
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


def staleness(version: str, promotions: dict[str, int]) -> int:
    """How many promotions were made after `version` (SelfImprovementLoop.promotions); a version never promoted
    in the run counts as older than any."""
    if version not in promotions:
        return len(promotions)
    return sum(1 for r in promotions.values() if r > promotions[version])


def _summarise(history: list[dict], groups: Sequence[Group]) -> dict:
    """A round's update in a few numbers (steps, loss, KL) and the monitors of its groups."""
    mean = lambda key: sum(m[key] for m in history) / len(history) if history else None  # noqa: E731
    return {
        "steps": len(history), "loss": mean("loss"), "kl": mean("kl"),
        "kl_last": history[-1]["kl"] if history else None, "clip_fraction": mean("clip_fraction"),
        "grad_norm": mean("grad_norm"), "skipped_nonfinite": sum(bool(m["skipped_nonfinite"]) for m in history),
        **monitors(groups),
    }

