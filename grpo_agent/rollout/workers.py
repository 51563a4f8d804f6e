"""Collection fanned out over Ray: N rollout workers each sample and score groups with their own engine, and
the loop, the store's one writer, logs what they return.

Work goes out in chunks (the loop's batches of tasks), each with its own seed made from the loop's seed and the
chunk's place in the task stream, so a chunk's groups do not depend on which worker answers it or on how many
workers there are. Chunks come back in order. A worker that dies (its process killed, out of memory, its node
gone) or that runs past `timeout` is replaced and its chunk given to the next free worker; a chunk is written
once, by the loop, after it has come back whole, so nothing is lost or written twice.

Each worker rebuilds the loop's agent from its Config (policy, fact index, scorer; no store) and follows the
run directory: before each chunk it loads the adapter the loop last promoted (into its own remote engine too,
when it has one), so groups record the version that sampled them. A local cluster listens on 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..errors import ConfigError, LoopError
from ..rundir import RunDir

RETRIES = 3  # times one chunk may take a worker down before the loop gives up on it


@dataclass
class Chunk:
    """A batch of tasks for one worker: where it starts in the loop's task stream, and how it is sampled."""

    start: int  # the loop's task cursor at its first task
    questions: list
    task_ids: list
    references: list
    seed: int | None
    meta: dict
    unit: str = "answer"  # loop.unit: K answers per task, or K multi-turn episodes


def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to the Ray cluster at `address`, or start a local one (on 127.0.0.1 only); returns whether this
    call started it (and so should shut it down)."""
    if not address:  # Ray's node address, which its servers bind to, is the loopback one where "clusters" are off
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Ray runs workers at nice 15; these do the sampling and scoring, the loop's main work, so they run at
        # the loop's own priority (at 15 anything else on the machine starves them: 10x slower to start here).
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        import ray
    except ImportError as e:
        raise LoopError("loop.workers runs rollout workers on Ray, which is not installed: "
                        "pip install 'ray>=2.40,<3'") from e
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


class _Worker:
    """One rollout worker (a Ray actor): the loop's agent, rebuilt from its Config, following the run."""

    def __init__(self, config: dict, run_dir: str | None, cwd: str, threads: int):
        import torch

        from ..agent import GRPOAgent
        from ..config import config_from_dict

        os.chdir(cwd)  # the Config's relative paths (model, index, rules) are the loop's
        torch.set_num_threads(threads)
        self.agent = GRPOAgent.from_config(config_from_dict(config))
        self.run, self.following = None, False
        self.follow(run_dir)

    def ready(self) -> int:
        return os.getpid()

    def follow(self, run_dir: str | None) -> None:
        if self.following and str(self.run.path) != run_dir:  # its weights are that run's now
            raise LoopError("rollout workers follow one run directory: start new workers for another run")
        if not self.following:
            self.run = RunDir(run_dir) if run_dir else None

    def answer(self, chunk: Chunk) -> list[dict | None]:
        if self.run is not None and not self.following and self.run.is_run():  # from the loop's first save on
            self.agent.follow(self.run.path)
            self.following = True
        answered = self.agent.answered(chunk.unit, chunk.questions, chunk.references, seed=chunk.seed)
        return self.agent.group_logs(chunk.questions, answered, chunk.task_ids, chunk.references, chunk.meta)


class RolloutWorkers:
    """`n` rollout workers on Ray, built from `cfg` (engine URLs in sampling.engine, comma-separated, are taken
    in turn, one per worker; none: each samples in-process). The loop makes them follow its run directory
    (follow()); until then they sample from the base weights.

    `cpus` and `gpus` are each worker's share; `timeout` (seconds) bounds one chunk. Use as a context manager,
    or call close()."""

    def __init__(self, cfg, n: int, address: str | None = None, cpus: int = 1, gpus: float = 0,
                 timeout: float = 1800.0):
        if n < 1:
            raise ConfigError(f"loop.workers = {n}: give at least one rollout worker (0 collects in-process)")
        self.base_config = dataclasses.asdict(cfg)
        self.engines = [u.strip() for u in cfg.sampling.engine.split(",") if u.strip()] or [""]
        self.n, self.timeout, self.cpus, self.gpus = n, timeout, cpus, gpus
        self.run_dir: str | None = None
        self.replaced = 0  # workers replaced after dying or timing out
        self.on_submit = None  # called (worker index, chunk, worker pid) as a chunk is handed out (tests use it)
        self._closing = False
        self._lock = threading.RLock()  # close() against a background collection replacing a worker
        self._started = start_ray(address, None if address else max(os.cpu_count() or 1, n * cpus))
        import ray

        self._ray = ray
        need = {"CPU": n * cpus, **({"GPU": n * gpus} if gpus else {})}
        have = ray.available_resources()  # (workers that cannot be placed would wait forever)
        short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
        if short:
            self.close()
            raise LoopError(f"the Ray cluster has {', '.join(f'{h:g} {k}' for k, (_, h) in short.items())} free but "
                            f"{n} workers need {', '.join(f'{v:g} {k}' for k, (v, _) in short.items())}: "
                            "use fewer workers or a bigger cluster")
        self._actor = ray.remote(_Worker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0)
        self.workers = [self._spawn(i) for i in range(n)]
        self.pids = [self._ready(i) for i in range(n)]

    def _spawn(self, i: int):
        """Worker i, with the i-th engine (in turn)."""
        config = {**self.base_config, "sampling": {**self.base_config["sampling"],
                                                   "engine": self.engines[i % len(self.engines)]}}
        return self._actor.remote(config, self.run_dir, os.getcwd(), max(1, int(self.cpus)))

    def follow(self, run_dir: str | os.PathLike) -> None:
        """Have every worker (and any that replaces one) load what the loop in `run_dir` promotes."""
        self.run_dir = str(os.path.abspath(run_dir))
        self._ray.get([w.follow.remote(self.run_dir) for w in self.workers], timeout=self.timeout)

    def _ready(self, i: int) -> int:
        try:
            return self._ray.get(self.workers[i].ready.remote(), timeout=self.timeout)
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.GetTimeoutError) as e:
            self.close()
            raise LoopError(f"rollout worker {i} could not start: {_cause(e)}") from None

    def answer(self, chunks: Sequence[Chunk], stop: threading.Event | None = None
               ) -> Iterator[tuple[Chunk, list[dict | None]]]:
        """Each chunk with what the store records of its tasks (GRPOAgent.group_logs), in the chunks' order,
        while the workers answer the ones after it. `stop` set: hand out no more chunks and return (the chunks in
        flight are abandoned). LoopError when the workers are closed before every chunk is back."""
        ray = self._ray
        todo = deque(range(len(chunks)))
        running: dict = {}  # object ref -> (worker index, chunk index, when it was handed out)
        done: dict[int, list] = {}
        failures = [0] * len(chunks)
        idle = deque(range(self.n))
        following = 0
        try:
            while following < len(chunks) and not (stop is not None and stop.is_set()):
                if self._closing:
                    raise LoopError(f"the rollout workers were closed with {len(chunks) - following} chunks of "
                                    "tasks unanswered; rerunning the loop resumes there")
                while idle and todo:
                    i, c = idle.popleft(), todo.popleft()
                    if self.on_submit is not None:
                        self.on_submit(i, chunks[c], self.pids[i])
                    running[self.workers[i].answer.remote(chunks[c])] = (i, c, time.monotonic())
                if running:
                    # every result in within the second, so none that is done is taken for a timeout
                    ready, _ = ray.wait(list(running), num_returns=len(running), timeout=1.0)
                    for ref in ready:
                        i, c, _ = running.pop(ref)
                        try:
                            done[c] = ray.get(ref)
                        except ray.exceptions.RayActorError as e:
                            self._replace(i, c, chunks[c], failures, todo, _cause(e))
                        except ray.exceptions.RayTaskError as e:  # an error in our code: the worker is fine
                            raise e.as_instanceof_cause() from None
                        idle.append(i)
                    now = time.monotonic()
                    for ref, (i, c, t0) in list(running.items()):
                        if now - t0 > self.timeout:
                            running.pop(ref)
                            ray.kill(self.workers[i], no_restart=True)
                            self._replace(i, c, chunks[c], failures, todo, f"no answer in {self.timeout:g} s")
                            idle.append(i)
                while following in done:
                    yield chunks[following], done.pop(following)
                    following += 1
        finally:  # left early (an error, or the caller stopped reading): no chunk may stay in flight
            with self._lock:
                for i, _, _ in (running.values() if ray.is_initialized() and not self._closing else ()):
                    ray.kill(self.workers[i], no_restart=True)
                    self.workers[i] = self._spawn(i)
                    self.pids[i] = self._ready(i)

    def _replace(self, i: int, c: int, chunk: Chunk, failures: list[int], todo: deque, why: str) -> None:
        """Worker i died on chunk c: start another in its place and put the chunk first in line."""
        failures[c] += 1
        if failures[c] >= RETRIES:
            raise LoopError(f"the chunk of tasks from cursor {chunk.start} took down {failures[c]} rollout workers "
                            f"(last: {why}); the groups logged so far are kept, and rerunning resumes here")
        self._ray.kill(self.workers[i], no_restart=True)  # (one only unreachable would keep its share)
        self.workers[i] = self._spawn(i)
        self.pids[i] = self._ready(i)
        self.replaced += 1
        todo.appendleft(c)

    def close(self) -> None:
        """Stop the workers (and the local cluster, if this started it)."""
        with getattr(self, "_lock", threading.Lock()):
            self._closing = True  # a collection running ahead in another thread stops handing out chunks
            ray = self._ray if hasattr(self, "_ray") else None
            if ray is None or not ray.is_initialized():
                return
            for w in getattr(self, "workers", []):
                ray.kill(w, no_restart=True)
            self.workers = []
            if self._started:
                ray.shutdown()

    def __enter__(self) -> "RolloutWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Ahead:
    """Chunks the workers answer in a background thread (RolloutWorkers.answer), while the loop updates,
    evaluates and gates: the next round's collection, sampled from whatever the loop has promoted when each
    chunk is handed out. Iterate it (once) for each chunk and its entries, in order, as they come back."""

    _END = object()

    def __init__(self, workers: RolloutWorkers, chunks: Sequence[Chunk], round: int):
        self.chunks, self.round = list(chunks), round
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, args=(workers,), name=f"collect-round-{round}",
                                        daemon=True)
        self._thread.start()

    @property
    def start(self) -> int:
        return self.chunks[0].start

    def _collect(self, workers: RolloutWorkers) -> None:
        try:
            for item in workers.answer(self.chunks, self._stop):
                self._queue.put(item)
        except BaseException as e:  # handed to the loop's thread, which raises it where it reads
            self._queue.put(e)
        self._queue.put(self._END)

    def cancel(self, timeout: float = 600.0) -> None:
        """Stop handing out chunks and wait for the thread (the workers still busy are replaced), so that no
        other collection shares the workers with it."""
        self._stop.set()
        self._thread.join(timeout)

    def __iter__(self) -> Iterator[tuple[Chunk, list[dict | None]]]:
        while (item := self._queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item


def _cause(e: Exception) -> str:
    """The first line of a Ray error, which names what happened."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
