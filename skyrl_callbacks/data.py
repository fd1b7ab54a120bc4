"""Exact resumption of the data order of a ``torch.utils.data.DataLoader``.

Two public names:

* :class:`DataLoaderStateMixin`: put it in front of your own ``DataLoader`` subclass
  (``class MyLoader(DataLoaderStateMixin, DataLoader)``) to get ``state_dict()`` /
  ``load_state_dict()``. It needs only torch.
* :class:`ResumableDataLoader`: a drop-in ``DataLoader`` with the same constructor. Its
  engine is torchdata's ``StatefulDataLoader`` when torchdata is importable, otherwise
  ``DataLoaderStateMixin`` + ``DataLoader``.

The contract: take ``S = loader.state_dict()`` together with the global RNG states after
``k`` batches of an epoch; build a fresh loader with the same arguments (fresh dataset,
generators seeded as at process start), call ``load_state_dict(S)`` and restore the RNG
states. Then the first ``iter()`` yields the remaining batches of that epoch (none when
all were yielded) without touching the global RNG, and each later ``iter()`` is a fresh
epoch drawing exactly what the uninterrupted run drew; batches and global RNG draws are
bitwise identical to the uninterrupted run. A state taken after the epoch's iterator
raised ``StopIteration`` resumes like the original would: the next ``iter()`` starts the
next epoch. States survive ``torch.save``/``torch.load`` (also ``weights_only=True`` for
the mixin engine).

How the mixin works: for map-style datasets it records, when the sampler starts each
epoch, the RNG states the sampler may draw from (global torch/``random``/numpy, every
``torch.Generator`` reachable from the loader and its samplers) and the samplers'
``epoch`` attributes (``DistributedSampler.set_epoch``), plus the number of batches
yielded. On resume it replays the sampler under those states, skips the consumed index
batches (their samples are never loaded), leaves the generators in their end-of-epoch
states and restores the caller's global RNG. ``num_workers`` may differ between save and
load. For ``IterableDataset`` it uses the dataset's own ``state_dict``/``load_state_dict``
(single-process loading only) or else fast-forwards by consuming batches, with a warning.

Caveats (user cooperation needed):

* The sampler's order must be a function of the RNG states and ``epoch`` listed above
  (true for every torch sampler); samplers with other hidden state are not supported by
  the mixin (torchdata uses a sampler's own ``state_dict`` when it has one).
* Randomness drawn inside worker processes (augmentations) is not replayed exactly after
  a mid-epoch resume; derive it from the sample index if it must be exact.
* One live iterator per loader: a second ``iter()`` starts a new epoch.
* IterableDatasets: the same ``num_workers`` must be used; with
  ``persistent_workers=True`` worker-side randomness of later epochs is not exact.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import random
import sys
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter, _SingleProcessDataLoaderIter

try:  # optional engine; importing it is cheap (a few ms after torch)
    from torchdata.stateful_dataloader import StatefulDataLoader as _StatefulDataLoader
    from torchdata.stateful_dataloader import stateful_dataloader as _td_module
except Exception:  # torchdata absent or broken: fall back to the mixin engine
    _StatefulDataLoader = None
    _td_module = None

__all__ = ["DataLoaderStateMixin", "ResumableDataLoader"]

logger = logging.getLogger(__name__)

_FORMAT = "skyrl_callbacks.data/1"
_FF_WARNING = (
    "{cls}: the IterableDataset has no state_dict/load_state_dict usable here, so resuming "
    "fast-forwards by loading and discarding {n} batch(es)."
)


# --------------------------------------------------------------------------- RNG helpers
def _global_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": None}
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (str(name), torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    return state


def _set_global_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np = sys.modules.get("numpy")
    if np is not None and state.get("numpy") is not None:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _samplers(loader: Any) -> list[Any]:
    """The loader's sampler, batch sampler and the batch sampler's inner sampler (deduplicated)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    found: list[Any] = []
    for obj in (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        if obj is not None and all(obj is not seen for seen in found):
            found.append(obj)
    return found


def _generators(loader: Any) -> list[torch.Generator]:
    """Every ``torch.Generator`` the loader or its samplers hold, in a stable order."""
    gens: list[torch.Generator] = []
    for obj in [loader, *_samplers(loader)]:
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not seen for seen in gens):
            gens.append(gen)
    return gens


def _epoch_holders(loader: Any) -> list[Any]:
    return [s for s in _samplers(loader) if isinstance(getattr(s, "epoch", None), int)]


def _set_gens(loader: Any, states: list[torch.Tensor]) -> None:
    for gen, state in zip(_generators(loader), states):
        gen.set_state(state)


def _capture(loader: Any) -> dict[str, Any]:
    """Everything a sampler may draw from: global RNGs, the generators and samplers' epochs."""
    return {
        "global": _global_rng(),
        "gens": [g.get_state() for g in _generators(loader)],
        "epochs": [h.epoch for h in _epoch_holders(loader)],
    }


def _apply(loader: Any, captured: Mapping[str, Any]) -> None:
    _set_global_rng(captured["global"])
    _set_gens(loader, captured["gens"])
    for holder, epoch in zip(_epoch_holders(loader), captured["epochs"]):
        holder.epoch = epoch


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


# ------------------------------------------------------------------------ state plumbing
class _Record:
    """Book-keeping for the epoch the loader's latest iterator belongs to."""

    def __init__(self, rng: Optional[dict[str, Any]] = None) -> None:
        self.rng = rng  # mixin map-style: captured at sampler start; else before iter()
        self.offset = 0  # batches skipped (already consumed before the resume)
        self.yielded = 0  # batches this iterator returned
        self.done = False  # this iterator raised StopIteration
        self.remaining: Optional[list[Any]] = None  # index batches left after a resume
        self.rewind: Optional[dict[str, Any]] = None  # RNG to restore after the base-seed draw
        self.iterator: Optional[weakref.ref] = None


def _meta(loader: DataLoader, engine: str) -> dict[str, Any]:
    iterable = isinstance(loader.dataset, IterableDataset)
    try:
        dataset_len: Optional[int] = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        dataset_len = None
    inner = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    try:
        num_batches: Optional[int] = None if iterable else len(inner)  # type: ignore[arg-type]
    except TypeError:
        num_batches = None
    return {
        "engine": engine,
        "kind": "iterable" if iterable else "map",
        "dataset_len": dataset_len,
        "num_batches": num_batches,
        "batch_size": loader.batch_size,
        "drop_last": loader.drop_last,
        "sampler": type(loader.sampler).__name__,
        "batch_sampler": type(loader.batch_sampler).__name__,
        "generators": len(_generators(loader)),
        "num_workers": loader.num_workers,
    }


def _check(loader: DataLoader, state: Any, engine: str) -> None:
    """Raise ValueError when ``state`` cannot be loaded into ``loader``."""
    name = type(loader).__name__
    if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
        raise ValueError(
            f"{name}.load_state_dict: not a data-loader state written by skyrl_callbacks.data "
            f"(expected format {_FORMAT!r}, got {state.get('format') if isinstance(state, Mapping) else type(state)!r})."
        )
    saved, mine = state["meta"], _meta(loader, engine)
    keys = [k for k in mine if k != "num_workers"]
    if engine == "torchdata" or mine["kind"] == "iterable":
        keys.append("num_workers")
    bad = [f"{k} (saved {saved.get(k)!r}, this loader {mine[k]!r})" for k in keys if saved.get(k) != mine[k]]
    if bad:
        raise ValueError(
            f"{name}.load_state_dict: incompatible data-loader state: {'; '.join(bad)}. Build the loader "
            "with the same dataset, batch size, sampler, generator and loader class as the saving run."
        )


class _CountingIter:
    """Iterator mix-in that counts yielded batches and notices the end of the epoch."""

    _rs_rec: Optional[_Record] = None

    def __next__(self) -> Any:
        rec = self._rs_rec
        try:
            data = super().__next__()  # type: ignore[misc]
        except StopIteration:
            if rec is not None:
                rec.done = True
            raise
        if rec is not None:
            rec.yielded += 1
        return data


class _CountingSingle(_CountingIter, _SingleProcessDataLoaderIter):
    pass


class _CountingMulti(_CountingIter, _MultiProcessingDataLoaderIter):
    pass


class _IndexProxy:
    """Stands in for the loader's index sampler: records or replays each epoch's order."""

    def __init__(self, loader: Any, inner: Iterable[Any]) -> None:
        # Weak: a loader -> persistent iterator -> proxy -> loader cycle would leave the
        # worker shutdown to the cyclic GC, which then waits out the join timeouts.
        self._loader = weakref.ref(loader)
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        loader = self._loader()  # alive: an iterator of it is being created or reset
        return self._run(loader, loader._rs_rec)

    def _run(self, loader: Any, rec: Optional[_Record]) -> Iterator[Any]:
        if rec is not None:
            if rec.rewind is not None:  # undo the base-seed draw of a continuing iterator
                rewind, rec.rewind = rec.rewind, None
                _apply(loader, rewind)
            if rec.remaining is not None:
                remaining, rec.remaining = rec.remaining, None
                del loader
                yield from remaining
                return
            if not isinstance(loader.dataset, IterableDataset):
                rec.rng = _capture(loader)
        del loader  # the loader may be a temporary: ``for b in MyLoader(...)``
        yield from self.inner


# ---------------------------------------------------------------------------- the mixin
class DataLoaderStateMixin:
    """Adds exact-resume ``state_dict``/``load_state_dict`` to a ``DataLoader`` subclass.

    Use as ``class MyLoader(DataLoaderStateMixin, DataLoader): ...``. It defines no
    ``__init__``, so the constructor (and Lightning's re-instantiation of the loader with
    a ``DistributedSampler``) is the ``DataLoader``'s. See the module docstring for the
    contract and caveats.
    """

    _rs_rec: Optional[_Record] = None
    _rs_pending: Optional[dict[str, Any]] = None

    @property
    def _index_sampler(self) -> _IndexProxy:
        inner = self.batch_sampler if self.batch_sampler is not None else self.sampler  # type: ignore[attr-defined]
        proxy = self.__dict__.get("_rs_proxy")
        if proxy is None or proxy.inner is not inner:
            proxy = self.__dict__["_rs_proxy"] = _IndexProxy(self, inner)
        return proxy

    def _get_iterator(self) -> Any:
        if self.num_workers == 0:  # type: ignore[attr-defined]
            return _CountingSingle(self)
        self.check_worker_number_rationality()  # type: ignore[attr-defined]
        return _CountingMulti(self)

    def state_dict(self) -> dict[str, Any]:
        """Return the resume state of the loader (plain dicts, tensors and ints).

        Returns:
            The state; before any iteration it describes a fresh loader.
        """
        if self._rs_pending is not None:  # loaded but not iterated yet
            return dict(self._rs_pending)
        loader: Any = self
        state: dict[str, Any] = {
            "format": _FORMAT,
            "meta": _meta(loader, "mixin"),
            "gens": [g.get_state() for g in _generators(loader)],
        }
        rec = self._rs_rec
        if rec is None:
            state["fresh"] = True
            return state
        state.update(
            yielded=rec.offset + rec.yielded,
            done=rec.done,
            rng=rec.rng,
            persistent_alive=bool(loader.persistent_workers and loader._iterator is not None),
        )
        if isinstance(loader.dataset, IterableDataset) and loader.num_workers == 0 and _is_stateful(loader.dataset):
            it = rec.iterator() if rec.iterator is not None else None
            state["dataset_state"] = loader.dataset.state_dict()
            state["ended"] = bool(getattr(getattr(it, "_dataset_fetcher", None), "ended", False))
        return state

    def load_state_dict(self, state_dict: Optional[Mapping[str, Any]]) -> None:
        """Arrange for the next ``iter()`` to continue from ``state_dict``.

        Args:
            state_dict: A state from :meth:`state_dict`; ``None`` or ``{}`` is a no-op.

        Raises:
            ValueError: The state is not from this module or does not fit this loader.
        """
        if not state_dict:
            return
        _check(self, state_dict, "mixin")  # type: ignore[arg-type]
        self._rs_pending = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        loader: Any = self
        state, self._rs_pending = self._rs_pending, None
        iterable = isinstance(loader.dataset, IterableDataset)
        if state is not None and not state.get("fresh") and state.get("dataset_state") is not None:
            loader.dataset.load_state_dict(state["dataset_state"])
        if state is not None and (state.get("fresh") or state["done"]):
            _set_gens(loader, state["gens"])
            if state.get("dataset_state") is not None:  # let the dataset see its resumed end
                for _ in self._rs_start(_Record(), rewind=True):
                    logger.warning("%s: a finished dataset yielded a batch on resume", type(self).__name__)
            return self._rs_start(_Record(), rewind=bool(state.get("persistent_alive")))
        if state is None:
            return self._rs_start(_Record())
        # Continue the interrupted epoch without consuming the caller's RNG.
        yielded, rec = state["yielded"], _Record(rng=state["rng"])
        if not iterable:
            if state["rng"] is None:  # iter() was called but its sampler had not started
                _set_gens(loader, state["gens"])
                return self._rs_start(_Record(), rewind=True)
            rec.offset, rec.remaining = yielded, self._rs_replay(state["rng"])[yielded:]
            return self._rs_start(rec, rewind=True)
        _set_gens(loader, state["gens"])
        if state.get("dataset_state") is not None:
            rec.offset = yielded
            rec.remaining = [] if state.get("ended") else None
            return self._rs_start(rec, rewind=True)
        if yielded:
            warnings.warn(_FF_WARNING.format(cls=type(self).__name__, n=yielded), UserWarning, stacklevel=2)
        now = _global_rng()
        _apply(loader, state["rng"])  # replay the epoch start: same base seed, same dataset draws
        try:
            it = self._rs_start(rec)
            for _ in itertools.islice(it, yielded):
                pass
        finally:
            _set_global_rng(now)
            _set_gens(loader, state["gens"])
        return it

    def _rs_start(self, rec: _Record, rewind: bool = False) -> Iterator[Any]:
        loader: Any = self
        if isinstance(loader.dataset, IterableDataset) and rec.rng is None:
            rec.rng = _capture(loader)
        if rewind:
            rec.rewind = _capture(loader)
        self._rs_rec = rec
        try:
            it = super().__iter__()  # type: ignore[misc]
        finally:
            if rec.rewind is not None:  # the index proxy has not run yet (single process)
                _apply(loader, rec.rewind)
                rec.rewind = None
        it._rs_rec = rec
        rec.iterator = weakref.ref(it)
        return it

    def _rs_replay(self, rng: Mapping[str, Any]) -> list[Any]:
        """The epoch's full index order, replayed under its recorded RNG states.

        Leaves the generators in their end-of-epoch states and everything else as it was.
        """
        loader: Any = self
        now = _capture(loader)
        _apply(loader, rng)
        try:
            batches = list(self._index_sampler.inner)
            end = [g.get_state() for g in _generators(loader)]
        finally:
            _apply(loader, now)
        _set_gens(loader, end)
        return batches


class _MixinResumableDataLoader(DataLoaderStateMixin, DataLoader):
    """``ResumableDataLoader`` engine used when torchdata is not importable."""


# ---------------------------------------------------------------------- torchdata engine
if _StatefulDataLoader is not None:
    _FINISHED = getattr(_td_module, "_ITERATOR_FINISHED", "_iterator_finished")

    class ResumableDataLoader(_StatefulDataLoader):  # type: ignore[misc, valid-type]
        """Drop-in ``DataLoader`` (same constructor) with exact ``state_dict``/``load_state_dict``.

        Engine: torchdata's ``StatefulDataLoader`` (importable here), wrapped so that a
        resume replays the RNG and never consumes the caller's. See the module docstring.
        """

        _rs_rec: Optional[_Record] = None
        _rs_pending: Optional[dict[str, Any]] = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            with warnings.catch_warnings():  # torchdata calls the deprecated torch.set_vital
                warnings.filterwarnings("ignore", message=".*set_vital.*")
                super().__init__(*args, **kwargs)

        __init__.__signature__ = inspect.signature(_StatefulDataLoader.__init__)  # type: ignore[attr-defined]

        def state_dict(self) -> dict[str, Any]:
            """Return the resume state: torchdata's plus the RNG book-keeping."""
            if self._rs_pending is not None:
                return dict(self._rs_pending)
            state: dict[str, Any] = {
                "format": _FORMAT,
                "meta": _meta(self, "torchdata"),
                "gens": [g.get_state() for g in _generators(self)],
            }
            it = self._iterator
            if self._rs_rec is None or it is None:  # never iterated: no iterator is created
                state["fresh"] = True
                return state
            state.update(
                inner=super().state_dict(),
                rng=self._rs_rec.rng,
                done=bool(it._finished),
                yielded=it._num_yielded,
                stateful=_is_stateful(self.dataset),
            )
            return state

        def load_state_dict(self, state_dict: Optional[Mapping[str, Any]]) -> None:
            """Arrange for the next ``iter()`` to continue from ``state_dict``.

            Args:
                state_dict: A state from :meth:`state_dict`; ``None`` or ``{}`` is a no-op.

            Raises:
                ValueError: The state is not from this module or does not fit this loader.
            """
            if not state_dict:
                return
            _check(self, state_dict, "torchdata")
            if state_dict.get("fresh"):
                super().load_state_dict({})
            else:  # resume the iterator where it was; a finished one is drained in __iter__
                super().load_state_dict({**state_dict["inner"], _FINISHED: False})
            self._rs_pending = dict(state_dict)

        def __iter__(self) -> Iterator[Any]:
            state, self._rs_pending = self._rs_pending, None
            if state is None or state.get("fresh"):
                if state is not None:
                    _set_gens(self, state["gens"])
                return self._rs_fresh()
            iterable = isinstance(self.dataset, IterableDataset)
            if iterable and not state["stateful"] and state["yielded"] and not state["done"]:
                warnings.warn(
                    _FF_WARNING.format(cls=type(self).__name__, n=state["yielded"]), UserWarning, stacklevel=2
                )
            now = _capture(self)
            _apply(self, state["rng"])  # the RNG as it was when the interrupted epoch began
            try:
                it = super().__iter__()
                if not iterable and self.num_workers == 0 and not _is_stateful(it._sampler_iter):
                    it._sampler_iter = iter(list(it._sampler_iter))  # draw while the RNG is replayed
            finally:
                _apply(self, now)
                _set_gens(self, state["gens"])
            self._rs_rec = _Record(rng=state["rng"])
            if state["done"]:
                for _ in it:  # already exhausted when saved: nothing is left
                    logger.warning("%s: a finished iterator yielded a batch on resume", type(self).__name__)
                return self._rs_fresh()
            return it

        def _rs_fresh(self) -> Iterator[Any]:
            self._rs_rec = _Record(rng=_capture(self))
            return super().__iter__()

else:

    class ResumableDataLoader(_MixinResumableDataLoader):  # type: ignore[no-redef]
        """Drop-in ``DataLoader`` (same constructor) with exact ``state_dict``/``load_state_dict``.

        Engine: :class:`DataLoaderStateMixin` (torchdata is not importable). See the module
        docstring for the contract and caveats.
        """
