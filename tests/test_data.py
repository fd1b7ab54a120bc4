"""Exact-resume contract of ``skyrl_callbacks.data``.

Reference run: ``E`` epochs of ``for batch in loader``, with global RNG draws (torch,
``random``, numpy) between batches, saving ``loader.state_dict()`` plus the global RNG
states at chosen points. Resumed run: a fresh loader (fresh dataset and generator objects,
different global RNG at construction), ``load_state_dict`` of the ``torch.save``d state,
RNG restored, then the rest of the epochs. Batches and draws must be bitwise identical to
the tail of the reference run.
"""

from __future__ import annotations

import importlib.util
import io
import random
import sys
import warnings
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler, Sampler
from torch.utils.data import TensorDataset, get_worker_info

from skyrl_callbacks import data
from skyrl_callbacks.data import DataLoaderStateMixin, ResumableDataLoader

E = 3  # epochs
N = 10  # samples; batch size 3 -> 4 batches (last one partial)
HAS_TORCHDATA = data._StatefulDataLoader is not None


class UserLoader(DataLoaderStateMixin, DataLoader):
    """A user's own DataLoader subclass with the mixin in front."""


class BrokenLoader(DataLoaderStateMixin, DataLoader):
    """Ignores the state: the contract checker must catch it."""

    def load_state_dict(self, state_dict: Any) -> None:
        pass


LOADERS: dict[str, type] = {"mixin": UserLoader, "fallback": ResumableDataLoader}
if HAS_TORCHDATA:
    LOADERS["torchdata"] = data.TorchdataResumableDataLoader
CLASSES = list(LOADERS)
# Worker-process tests are the slow ones; the fallback engine is the mixin on a plain
# DataLoader, so there it only runs when it is the ResumableDataLoader (no torchdata).
WORKER_CLASSES = ["mixin", "torchdata" if HAS_TORCHDATA else "fallback"]


class BucketBatchSampler(Sampler):
    """A custom batch sampler (not a BatchSampler): shuffled sorted buckets, lazy RNG draws."""

    def __init__(self, n: int, batch_size: int, generator: Optional[torch.Generator] = None) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        buckets = [sorted(perm[i : i + self.batch_size]) for i in range(0, self.n, self.batch_size)]
        for j in torch.randperm(len(buckets), generator=self.generator).tolist():
            yield buckets[j]

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


class LoggingDataset(Dataset):
    """Map-style dataset that logs which indices were loaded."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.seen.append(i)
        return torch.tensor(100 + i)


class Stream(IterableDataset):
    """Iterable dataset without state: shuffles with the (worker-seeded) global RNG."""

    def __init__(self, n: int = N) -> None:
        self.n = n

    def _order(self) -> list[int]:
        info = get_worker_info()
        if info is None:
            return torch.randperm(self.n).tolist()
        gen = torch.Generator().manual_seed(info.seed - info.id)  # shared by the workers
        return torch.randperm(self.n, generator=gen).tolist()[info.id :: info.num_workers]

    def __iter__(self):
        for i in self._order():
            yield torch.tensor(100 + i)


class StatefulStream(Stream):
    """Iterable dataset with torchdata-style state: the first iter() after load_state_dict
    resumes from the loaded position, any other iter() starts a new pass."""

    def __init__(self, n: int = N) -> None:
        super().__init__(n)
        self.passes, self.pos, self._resume = 0, 0, False

    def __iter__(self):
        if not self._resume:
            self.passes, self.pos = self.passes + 1, 0
        self._resume = False
        return self._items()

    def _items(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        gen = torch.Generator().manual_seed(1000 + self.passes)
        order = torch.randperm(self.n, generator=gen).tolist()[wid::nw]
        while self.pos < len(order):
            self.pos += 1
            yield torch.tensor(100 + order[self.pos - 1])

    def state_dict(self) -> dict:
        return {"passes": self.passes, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.passes, self.pos, self._resume = state["passes"], state["pos"], True


def make_loader(cls: type, kind: str, nw: int, persistent: bool = False, n: int = N, bs: int = 3):
    """Build a loader exactly as a user would at process start; returns (loader, sampler)."""
    kw: dict[str, Any] = dict(batch_size=bs, num_workers=nw, persistent_workers=persistent)
    ds: Any = TensorDataset(torch.arange(100, 100 + n))
    sampler = None
    if kind == "seq":
        pass
    elif kind == "shuffle":
        kw["shuffle"] = True
    elif kind == "shuffle_gen":
        kw.update(shuffle=True, generator=torch.Generator().manual_seed(7))
    elif kind in ("dist0", "dist1"):
        sampler = DistributedSampler(ds, num_replicas=2, rank=int(kind[-1]), shuffle=True, seed=3)
        kw.update(sampler=sampler, batch_size=2)
    elif kind in ("buckets", "buckets_gen"):
        gen = torch.Generator().manual_seed(5) if kind == "buckets_gen" else None
        del kw["batch_size"]
        kw["batch_sampler"] = BucketBatchSampler(n, bs, gen)
    elif kind == "unbatched":
        kw.update(batch_size=None, shuffle=True, generator=torch.Generator().manual_seed(9))
    elif kind == "replacement":
        kw["sampler"] = RandomSampler(ds, replacement=True, num_samples=40, generator=torch.Generator().manual_seed(4))
    elif kind == "logging":
        ds = LoggingDataset(n)
        kw.update(shuffle=True, generator=torch.Generator().manual_seed(7))
    elif kind in ("stream", "stateful_stream"):
        ds = Stream(n) if kind == "stream" else StatefulStream(n)
    else:
        raise AssertionError(kind)
    return cls(ds, **kw), sampler


def _plain(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.tolist()
    return [_plain(b) for b in batch]


def _draw() -> tuple:
    """A training step's global RNG use, as raw bytes (bitwise comparison)."""
    return (torch.rand(1).numpy().tobytes(), random.random().hex(), np.random.rand().hex())


def _rng() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _set_rng(state: tuple) -> None:
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


def _seed(s: int) -> None:
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def _dump(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _load(blob: bytes, weights_only: bool = False) -> dict:
    return torch.load(io.BytesIO(blob), weights_only=weights_only)


def _epoch(loader: Any, sampler: Any, e: int, seq: list, on_batch: Optional[Callable] = None) -> None:
    if sampler is not None:
        sampler.set_epoch(e)  # as Lightning does, before iter()
    for k, batch in enumerate(loader, 1):
        seq.append(_plain(batch))
        seq.append(_draw())
        if on_batch is not None:
            on_batch(e, k)


Save = tuple  # (epoch, k) with k >= 1 inside the loop, or (epoch, "end") after it; ("fresh",)


def reference(factory: Callable, save: bool) -> tuple[list, dict, list[int]]:
    """Uninterrupted run; with ``save``, the state at every point: {point: (blob, rng, position)}."""
    _seed(1234)
    loader, sampler = factory()
    seq: list = []
    states: dict = {}

    def snap(point: Save) -> None:
        if save:
            states[point] = (_dump(loader.state_dict()), _rng(), len(seq))

    snap(("fresh",))
    counts = []
    for e in range(E):
        before = len(seq)
        _epoch(loader, sampler, e, seq, lambda e, k: snap((e, k)))
        counts.append((len(seq) - before) // 2)
        snap((e, "end"))
    return seq, states, counts


def resumed(factory: Callable, point: Save, blob: bytes, rng: tuple, weights_only: bool = False) -> list:
    _seed(999)  # a different process: nothing may depend on the RNG at construction
    loader, sampler = factory()
    loader.load_state_dict(_load(blob, weights_only))
    _set_rng(rng)
    first = 0 if point == ("fresh",) else point[0] + (point[1] == "end")
    seq: list = []
    for e in range(first, E):
        _epoch(loader, sampler, e, seq)
    return seq


def check_contract(
    factory: Callable, points: Callable[[list[int]], list], weights_only: bool = False, pristine: bool = True
) -> list:
    """Run the reference, resume from the chosen points, assert bitwise equality of the tails."""
    ref, states, counts = reference(factory, save=True)
    if pristine:  # taking states must not change the run (skipped for workers: slow)
        assert reference(factory, save=False)[0] == ref, "state_dict() changed the reference run"
    for point in points(counts):
        blob, rng, pos = states[point]
        got = resumed(factory, point, blob, rng, weights_only)
        assert got == ref[pos:], f"resume from {point} diverged from the reference run"
    return ref


def every_point(counts: list[int]) -> list:
    """Before iterating, every k of epoch 0, then the epoch boundaries (inside and after the loop)."""
    pts: list = [("fresh",)] + [(0, k) for k in range(1, counts[0] + 1)] + [(0, "end")]
    return pts + [(1, counts[1]), (1, "end"), (2, 1), (2, counts[2])]


def few_points(counts: list[int]) -> list:
    """Mid-epoch, the last batch of an epoch (inside the loop), after the loop, a later epoch."""
    return [(0, 2), (1, counts[1]), (1, "end"), (2, 1)]


def worker_points(counts: list[int]) -> list:
    return [(0, 2), (1, counts[1]), (1, "end")]


MAP_KINDS = ["seq", "shuffle", "shuffle_gen", "dist0", "dist1", "buckets", "buckets_gen", "unbatched", "replacement"]


@pytest.mark.parametrize("kind", MAP_KINDS)
@pytest.mark.parametrize("cls", CLASSES)
def test_resume_single_process_every_point(cls: str, kind: str) -> None:
    ref = check_contract(lambda: make_loader(LOADERS[cls], kind, 0), every_point)
    if kind not in ("seq", "dist0", "dist1"):  # the test is meaningful: epochs differ
        n = len(ref) // E
        assert ref[0:n:2] != ref[n : 2 * n : 2]


@pytest.mark.parametrize("kind", ["shuffle", "buckets"])  # shuffle_gen, dist1: persistent test
@pytest.mark.parametrize("cls", WORKER_CLASSES)
def test_resume_two_workers(cls: str, kind: str) -> None:
    check_contract(lambda: make_loader(LOADERS[cls], kind, 2), worker_points, pristine=False)


@pytest.mark.parametrize("kind", ["shuffle", "shuffle_gen", "dist1"])
@pytest.mark.parametrize("cls", WORKER_CLASSES)
def test_resume_persistent_workers(cls: str, kind: str) -> None:
    check_contract(lambda: make_loader(LOADERS[cls], kind, 2, persistent=True), worker_points, pristine=False)


@pytest.mark.parametrize("kind", ["stream", "stateful_stream"])
@pytest.mark.parametrize("cls,nw", [(c, 0) for c in CLASSES] + [(c, 2) for c in WORKER_CLASSES])
def test_resume_iterable_dataset(cls: str, kind: str, nw: int) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        points = worker_points if nw else few_points
        check_contract(lambda: make_loader(LOADERS[cls], kind, nw), points, pristine=nw == 0)
    fast_forwarded = any("fast-forward" in str(w.message) for w in caught)
    # the dataset's own state is used when it has one (the mixin: single-process only)
    assert fast_forwarded == (kind == "stream" or (cls != "torchdata" and nw > 0))


@pytest.mark.parametrize("cls", CLASSES)
def test_skipped_samples_are_never_loaded(cls: str) -> None:
    ref, states, counts = reference(lambda: make_loader(LOADERS[cls], "logging", 0), save=True)
    blob, rng, pos = states[(1, 3)]
    _seed(999)
    loader, _ = make_loader(LOADERS[cls], "logging", 0)
    loader.load_state_dict(_load(blob))
    _set_rng(rng)
    got = [b for e in (1, 2) for b in loader]
    assert [_plain(b) for b in got] == ref[pos::2]
    assert sorted(loader.dataset.seen) == sorted(i - 100 for b in got for i in b.tolist())


@pytest.mark.parametrize("cls,nw", [(c, 0) for c in CLASSES] + [(WORKER_CLASSES[-1], 2)])
def test_resume_of_a_resumed_run(cls: str, nw: int) -> None:
    def factory():
        return make_loader(LOADERS[cls], "shuffle", nw)

    ref, states, _ = reference(factory, save=True)
    blob, rng, pos = states[(0, 2)]
    _seed(5)
    loader, _ = factory()
    loader.load_state_dict(_load(blob))
    _set_rng(rng)
    seq: list = []
    saved = {}

    def save(e: int, k: int) -> None:
        if (e, k) == (1, 1):
            saved["s"] = (_dump(loader.state_dict()), _rng(), len(seq))

    for e in range(E):
        _epoch(loader, None, e, seq, save)
    assert seq == ref[pos:]
    blob2, rng2, pos2 = saved["s"]
    assert resumed(factory, (1, 1), blob2, rng2) == ref[pos + pos2 :]


@pytest.mark.parametrize("cls", CLASSES)
def test_state_loads_with_weights_only(cls: str) -> None:
    check_contract(lambda: make_loader(LOADERS[cls], "shuffle", 0), few_points, weights_only=True)


@pytest.mark.parametrize("cls", CLASSES)
def test_state_before_iteration_and_empty_load(cls: str) -> None:
    _seed(1)
    loader, _ = make_loader(LOADERS[cls], "shuffle", 0)
    before = torch.get_rng_state()
    state = loader.state_dict()
    assert state["fresh"] and torch.get_rng_state().equal(before)  # no iterator, no RNG draw
    plain = [_plain(b) for e in range(2) for b in loader]
    for empty in ({}, None):
        _seed(1)
        other, _ = make_loader(LOADERS[cls], "shuffle", 0)
        other.load_state_dict(empty)
        assert [_plain(b) for e in range(2) for b in other] == plain


@pytest.mark.parametrize("cls", CLASSES)
def test_incompatible_states_raise_value_error(cls: str) -> None:
    loader, _ = make_loader(LOADERS[cls], "shuffle", 0)
    next(iter(loader))
    state = _load(_dump(loader.state_dict()))
    with pytest.raises(ValueError, match="dataset_len"):
        make_loader(LOADERS[cls], "shuffle", 0, n=12)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(LOADERS[cls], "shuffle", 0, bs=4)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="sampler"):
        make_loader(LOADERS[cls], "seq", 0)[0].load_state_dict(state)
    if cls != "torchdata":  # torchdata's RandomSampler always owns a generator
        with pytest.raises(ValueError, match="generators"):
            make_loader(LOADERS[cls], "shuffle_gen", 0)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        make_loader(LOADERS[cls], "shuffle", 0)[0].load_state_dict({"foo": 1})
    for other in CLASSES:
        target = make_loader(LOADERS[other], "shuffle", 0)[0]
        if (other == "torchdata") != (cls == "torchdata"):
            with pytest.raises(ValueError, match="engine"):
                target.load_state_dict(state)
        else:
            target.load_state_dict(state)


def test_contract_check_can_fail() -> None:
    with pytest.raises(AssertionError, match="diverged"):
        check_contract(lambda: make_loader(BrokenLoader, "shuffle", 0), few_points)
    if HAS_TORCHDATA:  # plain StatefulDataLoader consumes the global RNG when it resumes
        with pytest.raises(AssertionError, match="diverged"):
            check_contract(lambda: make_loader(data._StatefulDataLoader, "seq", 0), few_points)


@pytest.mark.parametrize("rank,wrapped", [(0, False), (1, True)])
@pytest.mark.parametrize("cls", CLASSES)
def test_lightning_reinstantiation_with_distributed_sampler(cls: str, rank: int, wrapped: bool) -> None:
    """Lightning re-calls the constructor to inject a DistributedSampler (DDP); ``wrapped``:
    the loader was built inside a ``*_dataloader`` hook, where Lightning records its arguments."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.combined_loader import CombinedLoader
    from lightning.pytorch.utilities.data import _update_dataloader

    def factory():
        if wrapped:
            with _replace_dunder_methods(DataLoader, "dataset"):
                base, _ = make_loader(LOADERS[cls], "shuffle_gen", 0)
            assert hasattr(base, "__pl_saved_args")
        else:
            base, _ = make_loader(LOADERS[cls], "shuffle_gen", 0)
        sampler = DistributedSampler(base.dataset, num_replicas=2, rank=rank, shuffle=True, seed=11)
        loader = _update_dataloader(base, sampler=sampler)
        assert type(loader) is type(base) and loader.generator is base.generator
        # torchdata's BatchSampler subclass makes Lightning inject the sampler into a new batch sampler
        assert sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None))
        return loader, sampler

    check_contract(factory, few_points)
    combined = CombinedLoader(factory()[0], "max_size_cycle")
    iter(combined)
    next(combined)
    (state,) = combined._state_dicts()  # Lightning collects it as a stateful loader
    CombinedLoader(factory()[0], "max_size_cycle")._load_state_dicts([_load(_dump(state))])


@pytest.mark.parametrize("kind", ["shuffle", "shuffle_gen", "dist0", "buckets"])
def test_without_torchdata_resumable_falls_back_to_the_mixin(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A fresh copy of the module, imported while torchdata cannot be imported."""
    monkeypatch.setitem(sys.modules, "torchdata", None)
    monkeypatch.setitem(sys.modules, "torchdata.stateful_dataloader", None)
    spec = importlib.util.spec_from_file_location("_skyrl_data_without_torchdata", data.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._StatefulDataLoader is None and module.TorchdataResumableDataLoader is None
    assert issubclass(module.ResumableDataLoader, module._MixinResumableDataLoader)
    check_contract(lambda: make_loader(module.ResumableDataLoader, kind, 0), every_point)


@pytest.mark.parametrize("kind,nw", [("shuffle", 0), ("shuffle_gen", 0), ("dist1", 0), ("buckets", 0), ("shuffle", 2)])
def test_mixin_changes_nothing_for_plain_use(kind: str, nw: int) -> None:
    """Same batches and the same RNG draws as a plain DataLoader; temporaries work."""
    runs = []
    for cls in (DataLoader, UserLoader):
        _seed(3)
        loader, sampler = make_loader(cls, kind, nw, persistent=nw > 0)
        seq: list = []
        for e in range(2):
            _epoch(loader, sampler, e, seq)
        del loader
        seq += [_plain(b) for b in make_loader(cls, kind, nw)[0]]  # the loader is a temporary
        runs.append(seq + [_draw()])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("cls,nw", [(c, 0) for c in CLASSES] + [(c, 2) for c in WORKER_CLASSES])
def test_state_between_iter_and_first_batch(cls: str, nw: int) -> None:
    """The iterator exists (and drew its seed) but yielded nothing yet."""

    def run(blob: Optional[bytes] = None, rng: Optional[tuple] = None) -> tuple[list, Any]:
        _seed(1234 if blob is None else 999)
        loader, _ = make_loader(LOADERS[cls], "shuffle", nw)
        seq: list = []
        if blob is None:
            _epoch(loader, None, 0, seq)
            it = iter(loader)
            saved = (_dump(loader.state_dict()), _rng(), len(seq))
        else:
            loader.load_state_dict(_load(blob))
            _set_rng(rng)
            it, saved = iter(loader), None
        for batch in it:
            seq += [_plain(batch), _draw()]
        _epoch(loader, None, 2, seq)
        return seq, saved

    ref, (blob, rng, pos) = run()
    assert run(blob, rng)[0] == ref[pos:]
