"""Per-rank RNG snapshots: python ``random``, numpy, torch CPU and every CUDA device."""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["capture_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """The RNG states of this process, CPU-only and made of tensors and primitives only (they load
    with ``torch.load(weights_only=True)``; numpy's key array is stored as an int64 tensor)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = _numpy_to_portable(np.random.get_state())
    except ImportError:  # pragma: no cover - numpy ships with torch in practice
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` returned (missing entries are left alone)."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        try:
            import numpy as np

            np.random.set_state(_numpy_from_portable(state["numpy"]))
        except ImportError:  # pragma: no cover
            pass
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _numpy_to_portable(state: tuple) -> tuple:
    """``np.random.get_state()`` without numpy objects: ``(name, int64 tensor of the key, pos,
    has_gauss, cached_gaussian)`` with Python scalars."""
    name, keys, pos, has_gauss, gauss = state[:5]
    return (str(name), torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))


def _numpy_from_portable(state: Any) -> Any:
    """The argument of ``np.random.set_state`` for what :func:`_numpy_to_portable` returned, or for
    the raw ``get_state()`` tuple that older versions stored (ndarray key: passed as is)."""
    name, keys, *rest = state
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype("uint32")
    return (name, keys, *rest)
