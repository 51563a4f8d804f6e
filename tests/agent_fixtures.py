"""Building blocks shared by the agent, loop and LangChain tests: a small fact index and a tiny agent."""

from __future__ import annotations

from grpo_agent.agent import GRPOAgent
from grpo_agent.config import SamplingConfig, ScoringConfig
from grpo_agent.records import Passage
from grpo_agent.retrieval import FactIndex
from grpo_agent.scoring import build_self_scorer
from grpo_agent.store import TrajectoryStore

FACTS = [
    Passage("p1", "The snow leopard is listed as Vulnerable by the IUCN.", "IUCN 2017"),
    Passage("p2", "Sea turtles nest on sandy beaches; artificial lights disorient hatchlings.", "NOAA"),
    Passage("p3", "Pangolins are the most trafficked mammals, hunted for scales and meat.", "CITES"),
    Passage("p4", "Tigers number about 5,500 in the wild, most of them in India.", "GTF 2023"),
]
TASKS = [{"id": f"t{i}", "question": q} for i, q in enumerate([
    "What is the status of the snow leopard?", "What harms sea turtle hatchlings?",
    "Why are pangolins trafficked?", "How many tigers are left?", "Where do most tigers live?",
    "What do lights do to turtles?"])]
EVAL = [{"id": "e1", "question": "Is the snow leopard endangered?", "answer": "Vulnerable"},
        {"id": "e2", "question": "Which mammal is most trafficked?", "answer": "pangolin"}]


def make_agent(policy, embedder, store_path, k=4, max_new_tokens=12, seed=0):
    index = FactIndex.build(FACTS, embedder)
    scorer = build_self_scorer(ScoringConfig(), embedder=embedder)
    store = TrajectoryStore(store_path)
    sampling = SamplingConfig(k=k, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    return GRPOAgent(policy, index, scorer, store, k=k, sampling=sampling, top_k=2)
