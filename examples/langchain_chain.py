"""The self-improving agent inside a LangChain LCEL chain; every answer's group is logged for training.

    .venv/bin/python examples/langchain_chain.py ["your question"] [--model DIR] [--store runs/example.sqlite]
"""
import argparse
import json
from pathlib import Path

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from grpo_agent.agent import GRPOAgent
from grpo_agent.config import Config, PolicyConfig, SamplingConfig
from grpo_agent.integrations.langchain import GRPOChatModel, GRPORunRecorder
from grpo_agent.records import Passage
from grpo_agent.retrieval import Embedder, FactIndex

ap = argparse.ArgumentParser()
ap.add_argument("question", nargs="?", default="Why are pangolins trafficked, and what protects them?")
ap.add_argument("--model", default="default", help='"default" (bundled SmolLM2) or a local model directory')
ap.add_argument("--store", default="runs/example/store.sqlite")
args = ap.parse_args()

facts = Path(__file__).resolve().parent.parent / "data" / "conservation" / "passages.jsonl"
index = FactIndex.build([Passage(**json.loads(line)) for line in facts.open()], Embedder())
cfg = Config(policy=PolicyConfig(model=args.model), sampling=SamplingConfig(k=4, max_new_tokens=64, temperature=0.8))
agent = GRPOAgent.from_config(cfg, store_path=args.store, index=index)

prompt = ChatPromptTemplate.from_messages([("system", "Explain it to a school class."), ("human", "{question}")])
chain = prompt | GRPOChatModel(agent=agent) | StrOutputParser()
recorder = GRPORunRecorder(agent.store)  # keeps the chain's steps with the group they produced
print(chain.invoke({"question": args.question}, config={"callbacks": [recorder]}))
group = agent.store.groups()[-1]
print(f"\nlogged group {group.group_id}: {len(group.completions)} answers, best composite "
      f"{max(c.composite for c in group.completions):.3f}; steps recorded: {len(agent.store.steps(group.group_id))}")
