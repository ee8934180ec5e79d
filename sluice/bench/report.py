"""Where benchmark results go and how they are written (shared by `bench throughput` and `bench serve`)."""
from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any

DEFAULT_RESULTS_DIR = os.path.join("benchmarks", "results")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", os.path.basename(str(text)).lower()).strip("-")


def default_output_path(kind: str, report: dict[str, Any], suffix: str = "") -> str:
    """benchmarks/results/<kind>_<workload>_<model>_<device>[_<suffix>]_<timestamp>.json"""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parts = [kind, report["workload"], _slug(report["model"]), _slug(report["device"]), suffix, stamp]
    return os.path.join(DEFAULT_RESULTS_DIR, "_".join(p for p in parts if p) + ".json")


def write_report(report: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")
