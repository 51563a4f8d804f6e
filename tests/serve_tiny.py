"""Run by tests/test_server_shutdown.py: serve a tiny agent on 127.0.0.1 whose every forward pass is slowed.

    python tests/serve_tiny.py MODEL_DIR STORE PORT SECONDS_PER_FORWARD
"""

import sys
import time

from grpo_agent.agent import GRPOAgent
from grpo_agent.config import SamplingConfig, ScoringConfig
from grpo_agent.rollout.policy import load_policy
from grpo_agent.scoring import build_self_scorer
from grpo_agent.server import ServerConfig, serve
from grpo_agent.store import TrajectoryStore

model_dir, store, port, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
policy = load_policy(model_dir, device="cpu")
forward = policy.model.forward


def slow_forward(*args, **kwargs):  # each decoding step takes `delay`: a long answer holds the worker
    time.sleep(delay)
    return forward(*args, **kwargs)


policy.model.forward = slow_forward
scorer = build_self_scorer(ScoringConfig(weights={"safety": 1.0}, gates=[]))  # the rules alone: no embedder, no judge
agent = GRPOAgent(policy, None, scorer, TrajectoryStore(store), k=2,
                  sampling=SamplingConfig(k=2, max_new_tokens=4, temperature=1.0, seed=0))
serve(agent, ServerConfig(port=port, batch_wait_ms=10, shutdown_grace_s=1.0))
