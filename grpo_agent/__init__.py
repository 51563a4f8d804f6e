"""grpo-agent: an LLM agent that improves itself with Group Relative Policy Optimization."""

from .config import Config, PolicyConfig, SamplingConfig, load_config
from .errors import ConfigError, GRPOAgentError, ModelLoadError
from .policy import Policy, load_policy
from .records import Completion, Group

__version__ = "0.1.0"

__all__ = [
    "Completion",
    "Config",
    "ConfigError",
    "GRPOAgentError",
    "Group",
    "ModelLoadError",
    "Policy",
    "PolicyConfig",
    "SamplingConfig",
    "load_config",
    "load_policy",
]
