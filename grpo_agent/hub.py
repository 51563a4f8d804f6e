"""Offline loading helpers shared by the policy and the embedder."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence transformers' weight-loading bars for a local load that takes about a second."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
