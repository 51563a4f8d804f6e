"""Adapters that plug grpo-agent into agent frameworks."""
