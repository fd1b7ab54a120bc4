"""Accelerate / plain-loop glue for SkyRLCheckpoint (bind once, call ``step`` every iteration)."""

from __future__ import annotations

from typing import Any, Optional


def bind(callback: Any, accelerator: Any = None, **roles_and_state: Any) -> Any:  # pragma: no cover - placeholder
    raise NotImplementedError("SkyRLCheckpoint.bind is not implemented yet")


def step(callback: Any, step: Optional[int] = None) -> Any:  # pragma: no cover - placeholder
    raise NotImplementedError("SkyRLCheckpoint.step is not implemented yet")


def finish(callback: Any) -> Any:  # pragma: no cover - placeholder
    raise NotImplementedError("SkyRLCheckpoint.finish is not implemented yet")
