"""DistContext: the few collectives the checkpoint code needs, and the single-process case.

Every rank reaches the same decision: rank 0 decides and broadcasts; an error on one rank
becomes an error on every rank (:meth:`DistContext.agree`), never a hang at a barrier.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, Optional, TypeVar

from skyrl_callbacks.errors import CheckpointError

logger = logging.getLogger(__name__)

__all__ = ["DistContext", "RankFailure"]

T = TypeVar("T")


class RankFailure(CheckpointError):
    """Raised on every rank when one or more ranks failed a collective checkpoint phase."""

    def __init__(self, phase: str, failures: dict[int, str]) -> None:
        lines = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
        super().__init__(f"{phase} failed on {len(failures)} rank(s): {lines}")
        self.phase = phase
        self.failures = failures


class DistContext:
    """Rank, world size and object collectives over ``torch.distributed`` (if initialised).

    Args:
        group: process group to use (default: the world).
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.enabled else 0
        self.world_size = dist.get_world_size(group) if self.enabled else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled and self.world_size > 1:
            self._dist.barrier(group=self.group)

    def broadcast(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.enabled or self.world_size == 1:
            return obj
        box = [obj if self.rank == src else None]
        self._dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, indexed by rank."""
        if not self.enabled or self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_to_main(self, obj: T) -> Optional[list[T]]:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if not self.enabled or self.world_size == 1:
            return [obj]
        out: Optional[list[Any]] = [None] * self.world_size if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def agree(self, phase: str, error: Optional[BaseException]) -> None:
        """Collective: raise on every rank if ``error`` is set on any rank.

        The failing rank re-raises its own exception (chained); the others raise
        :class:`RankFailure` naming the failing ranks and their messages.
        """
        msg = None if error is None else f"{type(error).__name__}: {error}"
        msgs = self.all_gather(msg)
        failures = {r: m for r, m in enumerate(msgs) if m is not None}
        if not failures:
            return
        if error is not None:
            if self.world_size == 1:
                raise error
            raise RankFailure(phase, failures) from error
        raise RankFailure(phase, failures)

    def run(self, phase: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank, then :meth:`agree` on the outcome."""
        error: Optional[BaseException] = None
        result: Any = None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised collectively below
            logger.debug("rank %d failed %s:\n%s", self.rank, phase, traceback.format_exc())
            error = exc
        self.agree(phase, error)
        return result

    def run_on_main(self, phase: str, fn: Callable[[], T]) -> Optional[T]:
        """Run ``fn`` on rank 0 only; its error is raised on every rank."""
        return self.run(phase, fn if self.is_main else (lambda: None))
