"""A LangGraph agent (create_react_agent) with its own search tool learns from its own runs: each task is run K
times, the K runs are logged as one group of multi-turn episodes (token ids as sampled, tool results masked),
scored without labels, and one GRPO update trains on them.

    .venv/bin/python examples/langgraph_episodes.py [--model DIR] [--store runs/example-episodes/store.sqlite]
"""
import argparse
import json
import warnings
from pathlib import Path

from langchain_core.tools import tool
from langgraph.prebuilt import create_react_agent

from grpo_agent.agent import GRPOAgent
from grpo_agent.config import Config, PolicyConfig, SamplingConfig, UpdateConfig
from grpo_agent.integrations.langchain import collect_episodes
from grpo_agent.records import Passage
from grpo_agent.retrieval import Embedder, FactIndex
from grpo_agent.updater import GRPOUpdater

warnings.filterwarnings("ignore", message=".*create_react_agent.*")  # LangGraph 1 points to langchain's create_agent
ap = argparse.ArgumentParser()
ap.add_argument("--model", default="default", help='"default" (bundled SmolLM2) or a local model directory')
ap.add_argument("--store", default="runs/example-episodes/store.sqlite")
args = ap.parse_args()

facts = Path(__file__).resolve().parent.parent / "data" / "conservation" / "passages.jsonl"
index = FactIndex.build([Passage(**json.loads(line)) for line in facts.open()], Embedder())
cfg = Config(policy=PolicyConfig(model=args.model), sampling=SamplingConfig(k=2, max_new_tokens=32, temperature=0.8))
agent = GRPOAgent.from_config(cfg, store_path=args.store, index=index)


@tool
def search(query: str) -> str:
    """Search the conservation notes."""
    return "\n".join(hit.passage.text for hit in index.search(query, 2))


def run(model, question):  # the user's own agent, built around the model it is given
    graph = create_react_agent(model, [search])
    return graph.invoke({"messages": [("user", question)]}, {"recursion_limit": 20})["messages"][-1].content


questions = ["Why are pangolins trafficked?", "How many tigers live in the wild?"]
groups = [collect_episodes(agent, q, run, seed=i) for i, q in enumerate(questions)]  # K runs each, logged
for q, g in zip(questions, groups):
    print(q)
    for c in g.completions:
        print(f"  composite {c.composite:.3f}, {len(c.turns)} turns: {c.text[:70]!r}")
steps = GRPOUpdater(agent.policy, UpdateConfig(learning_rate=1e-4)).train(groups)
print(f"one update on {len(groups)} episode groups ({sum(len(g.completions) for g in groups)} episodes): "
      f"{len(steps)} step(s), {sum(m['tokens'] for m in steps)} sampled tokens trained on")
