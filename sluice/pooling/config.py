"""PoolerConfig: how an embedding model turns hidden states into one vector, read from its folder.

sentence-transformers folders describe the head after the transformer in ``modules.json``:

    modules.json          [{"path": "",           "type": "...Transformer"},
                           {"path": "1_Pooling",  "type": "...Pooling"},      -> pooling type
                           {"path": "2_Normalize","type": "...Normalize"}]    -> normalize

    1_Pooling/config.json  legacy:  {"pooling_mode_lasttoken": true, "pooling_mode_mean_tokens": false, ...}
                           v6:      {"pooling_mode": "lasttoken", "include_prompt": true}

Without those files a pooling model gets vLLM's default for decoder embedding models: last-token
pooling, normalized. ``resolve_runner`` decides whether an engine pools at all (vLLM's ``--runner``
/ ``--task``, auto-detected from the sentence-transformers files or a ``*Model`` architecture).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUNNERS = ("auto", "generate", "pooling")
TASKS = ("auto", "generate", "embed")
POOLING_TYPES = ("LAST", "MEAN", "CLS")

# sentence-transformers' pooling mode names -> ours; the others (max, weighted mean, ...) are refused.
_ST_MODES = {"lasttoken": "LAST", "mean": "MEAN", "cls": "CLS"}
_ST_LEGACY_KEYS = {"pooling_mode_lasttoken": "lasttoken", "pooling_mode_mean_tokens": "mean",
                   "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean"}


@dataclass(frozen=True)
class PoolerConfig:
    """What the pooler computes for every request of a pooling engine."""
    pooling_type: str = "LAST"  # LAST | MEAN | CLS
    normalize: bool = True
    hidden_size: int = 0
    # Matryoshka models accept ``dimensions`` (the first d values, renormalized); None = any d up to hidden_size.
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None

    @property
    def needs_every_position(self) -> bool:
        """MEAN and CLS read hidden states of every prompt position: prefix-cache hits would skip some."""
        return self.pooling_type != "LAST"


def resolve_runner(runner: str, task: str, model_path: str, hf_config: Any) -> str:
    """``generate`` or ``pooling``, as vLLM decides it: the flags first, then the folder."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    from_task = {"embed": "pooling", "generate": "generate"}.get(task)
    if runner != "auto" and from_task is not None and runner != from_task:
        raise ValueError(f"runner {runner!r} contradicts task {task!r}")
    if runner != "auto":
        return runner
    if from_task is not None:
        return from_task
    if (Path(model_path) / "modules.json").is_file():
        return "pooling"  # sentence-transformers folders pool, whatever their architecture says
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if architectures and all(a.endswith("Model") for a in architectures):
        return "pooling"  # a bare decoder (e.g. Qwen3Model, saved without its LM head)
    return "generate"


def load_pooler_config(model_path: str, hf_config: Any) -> PoolerConfig:
    """The folder's sentence-transformers head, or last-token + normalize when it has none."""
    hidden_size = int(hf_config.hidden_size)
    matryoshka = getattr(hf_config, "matryoshka_dimensions", None)
    common = dict(hidden_size=hidden_size,
                  is_matryoshka=bool(getattr(hf_config, "is_matryoshka", False)) or matryoshka is not None,
                  matryoshka_dimensions=tuple(int(d) for d in matryoshka) if matryoshka else None)
    modules_file = Path(model_path) / "modules.json"
    if not modules_file.is_file():
        return PoolerConfig(pooling_type="LAST", normalize=True, **common)
    modules = json.loads(modules_file.read_text())
    kinds = {_module_kind(m.get("type", "")): m for m in modules}
    unsupported = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if unsupported:
        raise ValueError(f"modules.json of {model_path!r} has sentence-transformers modules sluice does not run: "
                         f"{', '.join(unsupported)} (supported: Transformer, Pooling, Normalize)")
    pooling_type = "LAST"
    if "Pooling" in kinds:
        pooling_type = _read_pooling_type(Path(model_path) / kinds["Pooling"].get("path", ""), hidden_size)
    return PoolerConfig(pooling_type=pooling_type, normalize="Normalize" in kinds, **common)


def _module_kind(type_name: str) -> str:
    """'sentence_transformers.models.Pooling' and v6's '...modules.pooling.Pooling' are both 'Pooling'."""
    return type_name.rsplit(".", 1)[-1]


def _read_pooling_type(folder: Path, hidden_size: int) -> str:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"the Pooling module has no config.json in {str(folder)!r}")
    config = json.loads(config_file.read_text())
    modes = config.get("pooling_mode")
    if modes is None:  # the legacy format: one boolean per mode
        modes = [mode for key, mode in _ST_LEGACY_KEYS.items() if config.get(key)]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in _ST_MODES:
        raise ValueError(f"pooling mode {modes} in {str(config_file)!r} is not supported: sluice pools with exactly "
                         f"one of {', '.join(_ST_MODES)}")
    dimension = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    if dimension is not None and int(dimension) != hidden_size:
        raise ValueError(f"{str(config_file)!r} pools {dimension}-dimensional embeddings, but the model's "
                         f"hidden_size is {hidden_size}")
    if config.get("include_prompt", True) is False:
        # Only sentence-transformers' encode(prompt=...) marks prompt tokens; requests here carry none, so
        # every token is pooled, exactly as sentence-transformers does for text without a prompt.
        logger.info("include_prompt=false in %s: requests carry no separate prompt, every token is pooled",
                    config_file)
    return _ST_MODES[modes[0]]


def resolve_pooler_config(runner: str, task: str, model_path: str, hf_config: Any) -> PoolerConfig | None:
    """The engine's PoolerConfig, or None for a generation engine."""
    if resolve_runner(runner, task, model_path, hf_config) != "pooling":
        return None
    return load_pooler_config(model_path, hf_config)


def prefix_caching_applies(pooler_config: PoolerConfig | None) -> bool:
    """Whether prefix caching can serve this engine's requests: not when MEAN or CLS pooling must run
    every prompt position (a hit would skip some), as in vLLM."""
    if pooler_config is not None and pooler_config.needs_every_position:
        logger.info("prefix caching is off: %s pooling reads every prompt position", pooler_config.pooling_type)
        return False
    return True
