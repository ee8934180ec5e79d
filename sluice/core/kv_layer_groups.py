"""How a model's attention layers split into KV groups (one block table each): by attention type, every group
the same size, so one KV tensor serves one layer of each group (core/hybrid_kv_manager.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVLayerGroup:
    """Layers (indices in model order) that share one block table; ``sliding_window`` None: global attention."""
    sliding_window: int | None
    layers: tuple[int, ...]


def is_hybrid(layer_windows: list[int | None]) -> bool:
    """Whether the model mixes windowed and global attention layers (the only case this manager serves)."""
    return any(w is None for w in layer_windows) and any(w is not None for w in layer_windows)


def kv_layer_groups(layer_windows: list[int | None]) -> list[KVLayerGroup]:
    """Groups the layers by window (None first), each type cut into groups of the smallest type's size.

        [W, G, W, G, W, W, G, W] -> size 3: G (1, 3, 6), W (0, 2, 4), W (5, 7)
    """
    by_window: dict[int | None, list[int]] = {}
    for layer, window in enumerate(layer_windows):
        by_window.setdefault(window, []).append(layer)
    size = min(len(layers) for layers in by_window.values())
    order = sorted(by_window, key=lambda w: (w is not None, w or 0))
    return [KVLayerGroup(window, tuple(by_window[window][i:i + size]))
            for window in order for i in range(0, len(by_window[window]), size)]
