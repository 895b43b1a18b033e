"""summary.json: the one file every run leaves behind, whatever happened to it.

Contract (design.md): ``{"status", "error", "metrics", "config", "decomp_layers", "versions"}``
plus ``stages`` (one row per stage of a multi-stage schedule), ``search_points`` (the points an accuracy-target
search evaluated), ``schedule`` (its outcome), ``run_dir``, ``started``, ``finished``, ``duration_s`` and ``extra`` (class names, split sizes,
the test confusion matrix). ``status`` is one of ``running``, ``completed``, ``failed``,
``interrupted``, ``pruned``. The file is written atomically at the start (``running``) and at the end.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
TRACKED_PACKAGES = (
    "lrk", "torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "omegaconf",
    "wandb", "tensorly", "optuna", "numpy", "scikit-learn", "pillow",
)  # fmt: skip


def package_versions() -> dict[str, str | None]:
    """Versions of Python, the packages a result depends on, and the git commit of the checkout."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["git_commit"] = _git_commit()
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _json_safe(value: Any) -> Any:
    """Floats that JSON cannot hold (NaN, inf) become null; tensors become numbers or lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class RunSummary:
    """The state of one run, written to ``<run_dir>/summary.json`` by :meth:`write`."""

    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    decomp_layers: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    #: one row per stage of a multi-stage schedule (lrk.pipeline.multistage), per evaluated point of a search
    #: (lrk.pipeline.accuracy_target), and the schedule's outcome (why it stopped, what was kept)
    stages: list[dict[str, Any]] = field(default_factory=list)
    search_points: list[dict[str, Any]] = field(default_factory=list)
    schedule: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / SUMMARY_FILE

    def to_dict(self) -> dict[str, Any]:
        finished = time.time() if self.status != "running" else None
        return _json_safe(
            {
                "status": self.status,
                "error": self.error,
                "metrics": dict(sorted(self.metrics.items())),
                "config": self.config,
                "decomp_layers": self.decomp_layers,
                "stages": self.stages,
                "search_points": self.search_points,
                "schedule": self.schedule,
                "versions": package_versions(),
                "run_dir": str(self.run_dir),
                "started": _iso(self.started),
                "finished": _iso(finished) if finished else None,
                "duration_s": (finished - self.started) if finished else None,
                "extra": self.extra,
            }
        )

    def write(self) -> Path:
        """Write atomically (a reader never sees half a file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        tmp.replace(self.path)
        return self.path


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """Load ``<run_dir>/summary.json``."""
    return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
