"""Exact resumption of a ``torch.utils.data.DataLoader``'s data order.

* :class:`DataLoaderStateMixin`: ``class MyLoader(DataLoaderStateMixin, DataLoader)`` gets
  ``state_dict()``/``load_state_dict()``; needs only torch.
* :class:`ResumableDataLoader`: drop-in ``DataLoader`` (same constructor), the mixin's engine.
* :class:`TorchdataResumableDataLoader`: the same contract on torchdata's ``StatefulDataLoader``
  (when torchdata is installed); not exact for mid-epoch resumes under Lightning DDP.

Contract: after ``k`` batches of an epoch take ``S = loader.state_dict()`` and the global RNG
states (torch, ``random``, numpy). A fresh loader built with the same arguments (fresh
dataset, generators seeded as at process start) that gets ``load_state_dict(S)`` and the RNG
states back yields, on its first ``iter()``, the rest of that epoch (nothing if ``k`` was
the last batch) without touching the global RNG; every later ``iter()`` is a new epoch that
draws exactly what the uninterrupted run drew. A state taken after the epoch's iterator
raised ``StopIteration`` resumes as the original would: the next ``iter()`` is the next
epoch. States are plain dicts/tensors (``torch.load(weights_only=True)`` works).

Mixin engine: for map-style datasets it records, when each epoch's sampler starts, every RNG
the sampler may draw from (global torch/``random``/numpy, each ``torch.Generator`` on the
loader and its samplers) and the samplers' ``epoch`` (``DistributedSampler.set_epoch``), and
counts yielded batches. A resume replays the sampler under those states, skips consumed
index batches (their samples are never loaded), leaves the generators in their end-of-epoch
states and gives the caller's RNG back; ``num_workers`` may change between save and load.
For an ``IterableDataset`` it uses the dataset's ``state_dict``/``load_state_dict`` with
``num_workers=0``, else fast-forwards by loading and discarding batches (with a warning).

Caveats (user cooperation):

* A sampler's order must depend only on those RNGs and ``epoch`` (true of torch's
  samplers); the torchdata engine also uses a sampler's own ``state_dict``.
* Randomness drawn inside worker processes (augmentations) is not replayed exactly after a
  mid-epoch resume: derive it from the sample index if that matters.
* Stateful IterableDatasets follow torchdata's convention: the first ``iter()`` after
  ``load_state_dict`` resumes, any other ``iter()`` starts a new pass. IterableDatasets must
  be resumed with the same ``num_workers`` (the torchdata engine: always).
* One live iterator per loader: a second ``iter()`` starts a new epoch.
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

__all__ = ["DataLoaderStateMixin", "ResumableDataLoader", "TorchdataResumableDataLoader", "finish_epoch_state"]

logger = logging.getLogger(__name__)

_FORMAT = "skyrl_callbacks.data/1"


# --------------------------------------------------------------------------- RNG helpers
def _global_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": None}
    np = sys.modules.get("numpy")
    if np is not None:  # numpy's own arrays would not load with weights_only=True
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


def _unique(objs: Iterable[Any]) -> list[Any]:
    found: list[Any] = []
    for obj in objs:
        if obj is not None and all(obj is not seen for seen in found):
            found.append(obj)
    return found


def _samplers(loader: Any) -> list[Any]:
    """The sampler, the batch sampler and the batch sampler's inner sampler."""
    batch_sampler = loader.batch_sampler
    return _unique([loader.sampler, batch_sampler, getattr(batch_sampler, "sampler", None)])


def _generators(loader: Any) -> list[torch.Generator]:
    gens = [getattr(obj, "generator", None) for obj in [loader, *_samplers(loader)]]
    return _unique(g for g in gens if isinstance(g, torch.Generator))


def _epoch_holders(loader: Any) -> list[Any]:
    return [s for s in _samplers(loader) if isinstance(getattr(s, "epoch", None), int)]


def _set_gens(loader: Any, states: list[torch.Tensor]) -> None:
    for gen, state in zip(_generators(loader), states):
        gen.set_state(state)


def _capture(loader: Any) -> dict[str, Any]:
    """Everything a sampler may draw from: global RNGs, generators, the samplers' epochs."""
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


def _len(obj: Any) -> Optional[int]:
    try:
        return len(obj)
    except TypeError:
        return None


def _warn_fast_forward(loader: Any, n: int) -> None:
    warnings.warn(
        f"{type(loader).__name__}: the IterableDataset has no state_dict/load_state_dict usable here, "
        f"so the resume fast-forwards by loading and discarding {n} batch(es).",
        UserWarning,
        stacklevel=3,
    )


def finish_epoch_state(state: Any, next_epoch: Optional[int] = None) -> Any:
    """The same loader state, as if its epoch's iterator had been run to exhaustion.

    A trainer that resumes on the last batch of an epoch (Lightning does: it never pulls
    past ``len`` batches of a sized loader) expects the next ``iter()`` to start the next
    epoch, not to yield the empty rest of this one. ``next_epoch``, when given, is set on
    the samplers (``DistributedSampler.epoch``) before that epoch's order is drawn, which
    matters with ``num_workers > 0`` where the order is drawn eagerly at ``iter()``.
    States of other loaders are returned unchanged.
    """
    if not isinstance(state, Mapping) or state.get("format") != _FORMAT or state.get("fresh"):
        return state
    out = dict(state)
    out["done"] = True
    if next_epoch is not None:
        out["next_epoch"] = int(next_epoch)
    return out


def _set_next_epoch(loader: Any, state: Mapping[str, Any]) -> None:
    epoch = state.get("next_epoch")
    if epoch is not None:
        for holder in _epoch_holders(loader):
            holder.epoch = epoch


# ------------------------------------------------------------------------ state plumbing
class _Record:
    """Book-keeping for the epoch of the loader's latest iterator."""

    def __init__(self, rng: Optional[dict[str, Any]] = None) -> None:
        self.rng = rng  # mixin, map-style: captured at sampler start; otherwise before iter()
        self.offset = 0  # batches consumed before a resume
        self.yielded = 0  # batches this iterator returned
        self.done = False  # this iterator raised StopIteration
        self.remaining: Optional[Iterable[Any]] = None  # index batches left after a resume
        self.rewind: Optional[dict[str, Any]] = None  # RNG to restore after the base-seed draw
        self.iterator: Optional[weakref.ref] = None


def _meta(loader: Any, engine: str) -> dict[str, Any]:
    iterable = isinstance(loader.dataset, IterableDataset)
    inner = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    return {
        "engine": engine,
        "kind": "iterable" if iterable else "map",
        "dataset_len": _len(loader.dataset),
        "num_batches": None if iterable else _len(inner),
        "batch_size": loader.batch_size,
        "drop_last": loader.drop_last,
        "sampler": type(loader.sampler).__name__,
        "batch_sampler": type(loader.batch_sampler).__name__,
        "generators": len(_generators(loader)),
        "num_workers": loader.num_workers,
    }


def _check(loader: Any, state: Any, engine: str) -> None:
    """Raise ValueError when ``state`` cannot be loaded into ``loader``."""
    name = type(loader).__name__
    if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
        got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"{name}.load_state_dict: not a data-loader state written by skyrl_callbacks.data "
            f"(expected format {_FORMAT!r}, got {got!r})."
        )
    saved, mine = state["meta"], _meta(loader, engine)
    strict_workers = engine == "torchdata" or mine["kind"] == "iterable"
    keys = [k for k in mine if k != "num_workers" or strict_workers]
    bad = [f"{k} (saved {saved.get(k)!r}, this loader {mine[k]!r})" for k in keys if saved.get(k) != mine[k]]
    if bad:
        raise ValueError(
            f"{name}.load_state_dict: incompatible data-loader state: {'; '.join(bad)}. Build the loader "
            "with the same dataset, batch size, sampler, generator and loader class as the saving run."
        )


class _CountingIter:
    """Iterator mix-in: counts yielded batches and notices the end of the epoch."""

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
        loader = self._loader()  # alive: one of its iterators is being created or reset
        return self._run(loader, loader._rs_rec)

    def _run(self, loader: Any, rec: Optional[_Record]) -> Iterator[Any]:
        remaining = None
        if rec is not None:
            if rec.rewind is not None:  # undo the base-seed draw of a continuing iterator
                rewind, rec.rewind = rec.rewind, None
                _apply(loader, rewind)
            remaining, rec.remaining = rec.remaining, None
            if remaining is None and not isinstance(loader.dataset, IterableDataset):
                rec.rng = _capture(loader)
        del loader  # the loader may be a temporary: ``for b in MyLoader(...)``
        yield from self.inner if remaining is None else remaining


# ---------------------------------------------------------------------------- the mixin
class DataLoaderStateMixin:
    """Adds exact-resume ``state_dict``/``load_state_dict`` to a ``DataLoader`` subclass.

    Use as ``class MyLoader(DataLoaderStateMixin, DataLoader): ...``. It defines no
    ``__init__``, so the constructor (and Lightning's re-instantiation of the loader with
    a ``DistributedSampler``) is the ``DataLoader``'s. See the module docstring.
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
        """Return the loader's resume state (dicts, lists, ints and tensors).

        Returns:
            The state; before any iteration it describes a fresh loader.
        """
        if self._rs_pending is not None:  # loaded but not iterated yet
            return dict(self._rs_pending)
        loader: Any = self
        gens = [g.get_state() for g in _generators(loader)]
        state: dict[str, Any] = {"format": _FORMAT, "meta": _meta(loader, "mixin"), "gens": gens}
        rec = self._rs_rec
        if rec is None:
            return {**state, "fresh": True}
        state.update(
            yielded=rec.offset + rec.yielded,
            done=rec.done,
            rng=rec.rng,
            persistent_alive=bool(loader.persistent_workers and loader._iterator is not None),
        )
        if isinstance(loader.dataset, IterableDataset) and loader.num_workers == 0 and _is_stateful(loader.dataset):
            fetcher = getattr(rec.iterator() if rec.iterator else None, "_dataset_fetcher", None)
            state.update(dataset_state=loader.dataset.state_dict(), ended=bool(getattr(fetcher, "ended", False)))
        return state

    def load_state_dict(self, state_dict: Optional[Mapping[str, Any]]) -> None:
        """Make the next ``iter()`` continue from ``state_dict``.

        Args:
            state_dict: A state from :meth:`state_dict`; ``None`` or ``{}`` is a no-op.

        Raises:
            ValueError: The state is not from this module or does not fit this loader.
        """
        if not state_dict:
            return
        _check(self, state_dict, "mixin")
        self._rs_pending = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        loader: Any = self
        state, self._rs_pending = self._rs_pending, None
        if state is None:
            return self._rs_start(_Record())
        dataset_state = state.get("dataset_state")
        if dataset_state is not None:
            loader.dataset.load_state_dict(dataset_state)
        _set_gens(loader, state["gens"])
        if state.get("fresh") or state["done"]:
            _set_next_epoch(loader, state)
            if dataset_state is not None:  # let the dataset see its resumed end first
                for _ in self._rs_start(_Record(), rewind=True):
                    logger.warning("%s: a finished dataset yielded a batch on resume", type(self).__name__)
            return self._rs_start(_Record(), rewind=bool(state.get("persistent_alive")))
        # Continue the interrupted epoch without consuming the caller's RNG.
        yielded, rec = state["yielded"], _Record(rng=state["rng"])
        if not isinstance(loader.dataset, IterableDataset):
            if state["rng"] is None:  # iter() had been called, but its sampler had not started
                return self._rs_start(_Record(), rewind=True)
            rec.offset, rec.remaining = yielded, self._rs_replay(state["rng"], yielded)
            return self._rs_start(rec, rewind=True)
        if dataset_state is not None:
            rec.offset, rec.remaining = yielded, ([] if state.get("ended") else None)
            return self._rs_start(rec, rewind=True)
        if yielded:
            _warn_fast_forward(self, yielded)
        now = _global_rng()
        _apply(loader, state["rng"])  # replay the epoch start: same base seed, same draws
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
        rec.rewind = _capture(loader) if rewind else None
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

    def _rs_replay(self, rng: Mapping[str, Any], skip: int) -> Iterator[Any]:
        """A live iterator over the epoch's index batches, replayed under its recorded RNG
        states and positioned after ``skip`` batches.

        The iterator stays lazy: draws a sampler makes later (``RandomSampler`` draws again
        when it is exhausted, which a consumer that stops after ``len`` batches never
        triggers) happen exactly when the consumer gets there, as in the original run. The
        global RNGs and sampler epochs are given back; the generators continue from the replay.
        """
        loader: Any = self
        now = _capture(loader)
        _apply(loader, rng)
        try:
            it = iter(self._index_sampler.inner)
            if skip:
                for _ in itertools.islice(it, skip):
                    pass
            else:  # run the sampler's start (its seed draw) under the recorded states
                first = next(it, _END)
                it = iter(()) if first is _END else itertools.chain([first], it)
        finally:
            _set_global_rng(now["global"])
            for holder, epoch in zip(_epoch_holders(loader), now["epochs"]):
                holder.epoch = epoch
        return it


_END = object()


class _MixinResumableDataLoader(DataLoaderStateMixin, DataLoader):
    """The ``ResumableDataLoader`` engine when torchdata is not importable."""


# ---------------------------------------------------------------------- torchdata engine
if _StatefulDataLoader is not None:
    _FINISHED = getattr(_td_module, "_ITERATOR_FINISHED", "_iterator_finished")

    class TorchdataResumableDataLoader(_StatefulDataLoader):  # type: ignore[misc, valid-type]
        """torchdata's ``StatefulDataLoader`` with the exact-resume RNG contract of this module.

        Prefer :class:`ResumableDataLoader` under Lightning DDP: Lightning wraps torchdata's own
        ``RandomSampler`` in a ``DistributedSamplerWrapper`` whose order a mid-epoch resume does
        not reproduce. Useful for ``IterableDataset`` pipelines with worker processes.
        """

        _rs_rec: Optional[_Record] = None
        _rs_pending: Optional[dict[str, Any]] = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            with warnings.catch_warnings():  # torchdata calls the deprecated torch.set_vital
                warnings.filterwarnings("ignore", message=".*set_vital.*")
                super().__init__(*args, **kwargs)

        __init__.__signature__ = inspect.signature(_StatefulDataLoader.__init__)  # type: ignore[attr-defined]

        def state_dict(self) -> dict[str, Any]:
            """Return the resume state: torchdata's plus the RNG book-keeping.

            Returns:
                The state; before any iteration it describes a fresh loader.
            """
            if self._rs_pending is not None:
                return dict(self._rs_pending)
            gens = [g.get_state() for g in _generators(self)]
            state: dict[str, Any] = {"format": _FORMAT, "meta": _meta(self, "torchdata"), "gens": gens}
            it = self._iterator
            if self._rs_rec is None or it is None:  # do not let torchdata create an iterator
                return {**state, "fresh": True}
            state.update(
                inner=super().state_dict(),
                rng=self._rs_rec.rng,
                done=bool(it._finished),
                yielded=it._num_yielded,
                stateful=_is_stateful(self.dataset),
            )
            return state

        def load_state_dict(self, state_dict: Optional[Mapping[str, Any]]) -> None:
            """Make the next ``iter()`` continue from ``state_dict``.

            Args:
                state_dict: A state from :meth:`state_dict`; ``None`` or ``{}`` is a no-op.

            Raises:
                ValueError: The state is not from this module or does not fit this loader.
            """
            if not state_dict:
                return
            _check(self, state_dict, "torchdata")
            # A finished iterator is restored unfinished and drained in __iter__, so that the
            # next epoch starts exactly as it would have (torchdata would start it twice).
            super().load_state_dict({} if state_dict.get("fresh") else {**state_dict["inner"], _FINISHED: False})
            self._rs_pending = dict(state_dict)

        def __iter__(self) -> Iterator[Any]:
            state, self._rs_pending = self._rs_pending, None
            if state is None or state.get("fresh"):
                if state is not None:
                    _set_gens(self, state["gens"])
                return self._rs_fresh()
            iterable = isinstance(self.dataset, IterableDataset)
            if iterable and not state["stateful"] and state["yielded"] and not state["done"]:
                _warn_fast_forward(self, state["yielded"])
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
            if not state["done"]:
                return it
            for _ in it:  # exhausted when saved: nothing is left
                logger.warning("%s: a finished iterator yielded a batch on resume", type(self).__name__)
            _set_next_epoch(self, state)
            return self._rs_fresh()

        def _rs_fresh(self) -> Iterator[Any]:
            self._rs_rec = _Record(rng=_capture(self))
            return super().__iter__()

else:
    TorchdataResumableDataLoader = None  # type: ignore[assignment,misc]


class ResumableDataLoader(_MixinResumableDataLoader):
    """Drop-in ``DataLoader`` (same constructor) with exact ``state_dict``/``load_state_dict``.

    Engine: :class:`DataLoaderStateMixin`, which replays each epoch's sampler order at the
    index level and works with Lightning's ``DistributedSampler`` injection under DDP. See
    the module docstring; :class:`TorchdataResumableDataLoader` is the torchdata-based variant.
    """
