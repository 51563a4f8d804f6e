"""The loop's update on several processes: `update.processes = N` runs each round's update under torchrun
(DDP: gloo on CPU, nccl on GPU), and the loop picks the result up from the run directory's checkpoint.

The loop writes the job (its policy and update settings, the round's group ids, the KL reference) to
`update_job.json` in the run directory and checkpoints the weights it holds; each of the N processes loads
the policy, resumes from that checkpoint, reads the groups from the store and trains on its share of every
step's rows (GRPOUpdater splits them by rank), rank 0 writing the checkpoints and metrics.jsonl as a single
process would. The result equals the single-process update (tests/test_updater.py, tests/test_loop.py).

    python -m torch.distributed.run --standalone --nproc_per_node N -m grpo_agent.update_job RUN/update_job.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .errors import UpdateError
from .hub import stop_session, tied_to_this_process

JOB = "update_job.json"


def run_update(run_dir: Path, store: Path, checkpoints: Path, policy: dict, update: dict, group_ids: Sequence[str],
               reference: str | None, checkpoint_every: int, processes: int, timeout: float | None = None) -> None:
    """Train on `group_ids` from `store` under torchrun on `processes` processes, from the newest checkpoint in
    `checkpoints` to a new one there. UpdateError (with the end of their output) when they fail."""
    job = run_dir / JOB
    job.write_text(json.dumps({"policy": policy, "update": update, "group_ids": list(group_ids),
                               "store": str(store), "checkpoints": str(checkpoints), "reference": reference,
                               "checkpoint_every": checkpoint_every}) + "\n", encoding="utf-8")
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "grpo_agent.update_job", str(job)]
    # Its own session, so that a timeout or Ctrl-C here stops torchrun and every rank it started, nothing else;
    # its output goes to a file (a pipe nobody reads while it is stopped could block its ranks).
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(tied_to_this_process(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            stop_session(proc)
            raise UpdateError(f"the update on {processes} processes ran past {timeout:g} s; rerun the loop to resume "
                              "from its last checkpoint") from e
        except BaseException:
            stop_session(proc)
            raise
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise UpdateError(f"the update on {processes} processes (torchrun) failed with exit code "
                          f"{proc.returncode}; rerun the loop to resume from its last checkpoint. Its output ended:"
                          f"\n{tail}")


def main(job_path: str) -> None:
    import torch
    import torch.distributed as dist

    from .config import PolicyConfig, UpdateConfig
    from .rollout.policy import load_policy
    from .store import TrajectoryStore
    from .updater import GRPOUpdater, train_with_checkpoints

    path = Path(job_path)
    job = json.loads(path.read_text(encoding="utf-8"))
    run, checkpoints = path.parent, Path(job["checkpoints"])
    policy_cfg = PolicyConfig(**job["policy"])
    gpu = policy_cfg.device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")
    try:
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        policy = load_policy(policy_cfg)
        updater = GRPOUpdater(policy, UpdateConfig(**job["update"]), output_dir=run)
        if not updater.resume(checkpoints):
            raise UpdateError(f"{checkpoints} holds no checkpoint to start the update from")
        if job["reference"]:
            updater.reset_reference(job["reference"])
        with TrajectoryStore(job["store"]) as store:
            groups = store.groups(ids=job["group_ids"])
        if len(groups) != len(job["group_ids"]):
            raise UpdateError(f"the store holds {len(groups)} of the job's {len(job['group_ids'])} groups")
        train_with_checkpoints(updater, groups, checkpoints, job["checkpoint_every"], progress=False)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
