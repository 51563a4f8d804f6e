"""Run by tests/test_updater.py under torchrun: train the tiny model on fixed groups and checkpoint."""

import sys

import torch.distributed as dist

from grpo_agent.config import UpdateConfig
from grpo_agent.rollout.policy import load_policy
from grpo_agent.updater import GRPOUpdater

model_dir, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
policy = load_policy(model_dir, device="cpu")
chats = [[{"role": "user", "content": q}] for q in
         ["Is the tiger endangered?", "What harms sea turtles?", "Why protect pangolins?", "Where do kakapo live?"]]
groups = policy.sample(chats, k=3, max_new_tokens=10, temperature=1.0, seed=0)  # same seed: same groups everywhere
for g in groups:
    for i, c in enumerate(g.completions):
        c.advantage = [1.2, -0.2, -1.0][i]
updater = GRPOUpdater(policy, UpdateConfig(groups_per_step=2, num_iterations=2, learning_rate=1e-3, beta=0.04), out)
updater.train(groups)
updater.save_checkpoint()
dist.destroy_process_group()
