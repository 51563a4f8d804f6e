"""Sample a group of K answers from the bundled policy and show what the updater will train on.

    .venv/bin/python examples/sample_group.py
"""

from grpo_agent import load_policy

policy = load_policy("default")
chat = [{"role": "user", "content": "Why are pangolins trafficked, and what protects them?"}]
(group,) = policy.sample([chat], k=4, max_new_tokens=64, temperature=0.8, seed=0)

print(f"prompt: {len(group.prompt_token_ids)} tokens, policy version {group.policy_version}")
for i, c in enumerate(group.completions, 1):
    total = sum(c.logprobs)
    print(f"\n[{i}] {c.finish_reason}, {len(c.token_ids)} tokens, sequence log-prob {total:.1f}\n{c.text}")
