"""grpo-agent: an LLM agent that improves itself with Group Relative Policy Optimization.

    from grpo_agent import GRPOAgent, SelfImprovementLoop, load_config

The public classes and functions are importable from the package; those that pull in models (torch,
transformers, faiss) load on first use, so `import grpo_agent` stays quick.
"""

from importlib import import_module
from typing import Any

from .config import (Config, ExperienceConfig, LoopConfig, PolicyConfig, RetrievalConfig, SamplingConfig,
                     ScoringConfig, UpdateConfig, load_config)
from .errors import (AgentError, ConfigError, ContextLengthError, ExperienceError, GRPOAgentError, LoopError,
                     ModelLoadError, RetrievalError, StoreError, UnknownGroupError, UpdateError)
from .records import Completion, Feedback, Group, GroupInfo, Lesson, Passage, UpdateRecord

__version__ = "0.1.0"

_LAZY = {  # name -> module that defines it, imported on first access
    "GRPOAgent": "agent", "Reply": "agent",
    "Policy": "rollout.policy", "load_policy": "rollout.policy", "RemoteEngine": "rollout.engines",
    "Embedder": "retrieval", "FactIndex": "retrieval", "ingest": "ingest",
    "SelfScorer": "scoring", "ScoreContext": "scoring", "ScoreResult": "scoring", "build_self_scorer": "scoring",
    "register": "scoring",
    "TrajectoryStore": "store",
    "GRPOUpdater": "updater",
    "SelfImprovementLoop": "loop",
    "ExperienceLibrary": "experience",
    "evaluate": "evaluation", "read_tasks": "evaluation",
    "EvalResult": "rundir", "LoopState": "rundir", "RunDir": "rundir",
    "write_report": "report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'grpo_agent' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AgentError", "Completion", "Config", "ConfigError", "ContextLengthError", "EvalResult", "Embedder",
    "ExperienceConfig", "ExperienceError", "ExperienceLibrary", "FactIndex", "Feedback", "GRPOAgent",
    "GRPOAgentError", "GRPOUpdater", "Group", "GroupInfo", "Lesson", "LoopConfig", "LoopError", "LoopState",
    "ModelLoadError", "Passage", "Policy", "PolicyConfig", "RemoteEngine", "Reply", "RetrievalConfig", "RetrievalError", "RunDir",
    "SamplingConfig", "ScoreContext", "ScoreResult", "ScoringConfig", "SelfImprovementLoop", "SelfScorer",
    "StoreError", "TrajectoryStore", "UnknownGroupError", "UpdateConfig", "UpdateError", "UpdateRecord",
    "build_self_scorer", "evaluate", "ingest", "load_config", "load_policy", "read_tasks", "register",
    "write_report",
]
