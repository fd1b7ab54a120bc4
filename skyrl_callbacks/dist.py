"""DistContext: the few collectives the checkpoint code needs, and the single-process case.

Every rank reaches the same decision: rank 0 decides and broadcasts; an error on one rank
becomes an error on every rank (:meth:`DistContext.agree`), never a hang at a barrier.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable, Optional, TypeVar

from skyrl_callbacks.errors import (
    CheckpointError,
    CheckpointLockError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    StorageError,
    UntrustedCheckpointError,
)

logger = logging.getLogger(__name__)

__all__ = ["DistContext", "RankFailure", "error_kind"]

T = TypeVar("T")

#: the error kinds a collective step keeps, most telling first: when ranks fail with different
#: kinds, the raised error is of the first kind any rank had (a corrupt file on one rank makes
#: the checkpoint corrupt for all of them); an untrusted file (a planted pickle) comes first, since
#: resume must stop there on every rank rather than fall back
ERROR_KINDS: tuple[type, ...] = (UntrustedCheckpointError, CorruptCheckpointError, IncompatibleCheckpointError, CheckpointLockError,
                                 CheckpointNotFoundError, ConfigError, StorageError)


def error_kind(error: BaseException) -> Optional[type]:
    """The first of :data:`ERROR_KINDS` ``error`` is an instance of (None: another error)."""
    for kind in ERROR_KINDS:
        if isinstance(error, kind):
            return kind
    return None


class RankFailure(CheckpointError):
    """Raised on every rank when one or more ranks failed a collective checkpoint phase.

    The rule for every collective step (:meth:`DistContext.agree`), at every world size: an error
    on any rank is raised on every rank, of the *kind* the failing rank raised (one of
    :data:`ERROR_KINDS`), so ``except CorruptCheckpointError`` catches it on every rank whether
    one process or 64 ran the step. At one process that is the original error; at several it is a
    ``RankFailure`` that is also an instance of that kind (``RankFailure.of(kind)``), names every
    failing rank and its message, and keeps each rank's kind in :attr:`kinds` (``{rank: class
    name}``). The failing rank's own exception is its ``__cause__``.
    """

    _by_kind: dict = {}

    def __init__(self, phase: str, failures: dict[int, str], kinds: Optional[dict[int, Optional[str]]] = None) -> None:
        lines = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
        super().__init__(f"{phase} failed on {len(failures)} rank(s): {lines}")
        self.phase = phase
        self.failures = failures
        self.kinds = dict(kinds or {})

    def has(self, kind: type) -> bool:
        """Whether any failing rank raised an error of ``kind`` (or a subclass)."""
        names = {k.__name__ for k in ERROR_KINDS if issubclass(k, kind)}
        return isinstance(self, kind) or any(n in names for n in self.kinds.values())

    def __reduce__(self) -> Any:  # the per-kind classes are made at run time: pickle by kind name
        kind = next((k for k in ERROR_KINDS if isinstance(self, k)), None)
        return _rebuild_rank_failure, (None if kind is None else kind.__name__, self.phase, self.failures, self.kinds)

    @classmethod
    def of(cls, kind: Optional[type]) -> type:
        """The ``RankFailure`` class that is also a ``kind`` (``RankFailure`` itself for None)."""
        if kind is None:
            return cls
        if kind not in cls._by_kind:
            cls._by_kind[kind] = type("RankFailure", (cls, kind), {"__module__": __name__,
                                                                    "__qualname__": f"RankFailure[{kind.__name__}]"})
        return cls._by_kind[kind]


def _rebuild_rank_failure(kind: Optional[str], phase: str, failures: dict, kinds: dict) -> RankFailure:
    cls = RankFailure.of(next((k for k in ERROR_KINDS if k.__name__ == kind), None))
    return cls(phase, failures, kinds)


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

        One process: ``error`` itself. Several: every rank raises ``RankFailure.of(kind)`` (see
        :class:`RankFailure`) naming the failing ranks and their messages, where ``kind`` is the
        most telling kind any rank failed with; the failing rank chains its own exception.
        """
        if self.world_size == 1 or not self.enabled:
            if error is not None:
                raise error
            return
        kind = None if error is None else error_kind(error)
        msg = None if error is None else (f"{type(error).__name__}: {error}", None if kind is None else kind.__name__)
        msgs = self.all_gather(msg)
        failures = {r: m[0] for r, m in enumerate(msgs) if m is not None}
        if not failures:
            return
        kinds = {r: m[1] for r, m in enumerate(msgs) if m is not None}
        seen = set(kinds.values())
        cls = RankFailure.of(next((k for k in ERROR_KINDS if k.__name__ in seen), None))
        exc = cls(phase, failures, kinds)
        if error is not None:
            raise exc from error
        raise exc

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
