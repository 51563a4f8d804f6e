"""Project exceptions: every message names the bad value and the fix."""


class GRPOAgentError(Exception):
    """Base class of every error grpo-agent raises on purpose."""


class ConfigError(GRPOAgentError, ValueError):
    """A configuration value or file is invalid."""


class ModelLoadError(GRPOAgentError):
    """A model could not be found or loaded."""
