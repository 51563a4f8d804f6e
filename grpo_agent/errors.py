"""Project exceptions, all in one place: every message names the bad value and the fix.

    GRPOAgentError            base of every error grpo-agent raises on purpose
      ConfigError             a configuration value or file (also a ValueError)
      ModelLoadError          a model that cannot be found or loaded
      RetrievalError          a fact index or corpus problem
      AgentError              a task the agent cannot answer as given
        ContextLengthError    a prompt plus its answer budget past the model's context window
      StoreError              a trajectory store problem
        UnknownGroupError     a group id the store does not hold
      UpdateError             bad training input or an unreadable checkpoint
      LoopError               a loop that cannot run as configured, or a run directory it cannot use
      ExperienceError         a lesson file that cannot be loaded
"""


class GRPOAgentError(Exception):
    """Base class of every error grpo-agent raises on purpose."""


class ConfigError(GRPOAgentError, ValueError):
    """A configuration value or file is invalid."""


class ModelLoadError(GRPOAgentError):
    """A model could not be found or loaded."""


class RetrievalError(GRPOAgentError):
    """A fact index or corpus problem: missing files, a mismatched embedder, an empty corpus."""


class AgentError(GRPOAgentError):
    """A task the agent cannot answer as given."""


class ContextLengthError(AgentError):
    """A prompt (with its retrieved facts) plus the answer's token budget does not fit the model's context."""

    def __init__(self, message: str, index: int = 0, prompt_tokens: int = 0, limit: int = 0):
        super().__init__(message)
        self.index = index  # which task of a batch is too long
        self.prompt_tokens, self.limit = prompt_tokens, limit


class StoreError(GRPOAgentError):
    """A trajectory store problem: unreadable or newer file, duplicate id, locked database."""


class UnknownGroupError(StoreError):
    """A group id the store does not hold."""


class UpdateError(GRPOAgentError):
    """Bad training input or an unreadable checkpoint."""


class LoopError(GRPOAgentError):
    """A loop that cannot run as configured, or a run directory it cannot use."""


class ExperienceError(GRPOAgentError):
    """A lesson file that cannot be loaded."""


class EngineError(GRPOAgentError):
    """A remote rollout engine (an inference server) could not be reached, refused a request, or answered in a
    way we cannot use."""
