"""Stager: reusable host buffers that hold a consistent copy of training state.

An async save copies the step's state here in the foreground (the only part the training
loop waits for) and writes the copy in the background. The buffers are allocated ahead of the
first save (:meth:`Stager.reserve`, from ``CheckpointManager.prewarm``) or by it, and reused by
the next ones (a copy into warm memory is several times faster than into fresh pages), pinned
when the source lives on a GPU so the device-to-host copy runs at full PCIe/NVLink-C2C speed.

A staged tree never aliases a live tensor: changing the weights right after ``stage``
returns does not change the copy. Tensors that share storage in the source (tied weights)
share one buffer in the copy, so a ``torch.save`` of the copy keeps the tie.

Deferred copies (``async_overlap_copy``): tensors whose storage is in :attr:`Stager.defer`
(parameters and optimizer state, which change only in ``optimizer.step()``) get their buffer in
``stage`` but are copied later by :meth:`Stager.finish`, in the background, while the next
step's forward and backward run; the caller must wait for ``finish`` before the next optimizer
step (the manager's step hooks do). Everything else (buffers, which a forward may update) is
copied in ``stage``.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any, Optional

import torch

__all__ = ["Stager", "deferrable_storages", "storage_key"]


def _is_dtensor(value: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(value, DTensor)


def _is_sharded_tensor(value: Any) -> bool:
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, ShardedTensor)


def _dtensor_around(t: Any, local: torch.Tensor) -> Any:
    """A DTensor with ``t``'s spec (mesh, placements, global shape) whose local tensor is ``local``.
    Built directly, not by ``t.to("cpu")``/``deepcopy`` (which copy the shard: at 5.6 GiB per rank
    that was a second full copy in the first async save's stall)."""
    try:
        from torch.distributed.tensor import DTensor

        out = DTensor(local, t._spec, requires_grad=False)
        if out.shape == t.shape and out.dtype == t.dtype and out._local_tensor is local:
            return out
    except Exception:  # noqa: BLE001 - a torch whose DTensor constructor differs: copy once, as before
        pass
    out = copy.deepcopy(t.detach()) if t.device.type == "cpu" else t.detach().to("cpu")
    out._local_tensor = local
    return out


def storage_key(t: torch.Tensor) -> tuple:
    """Identity of the memory a tensor (or a DTensor's local shard) lives in."""
    local = getattr(t, "_local_tensor", None)
    if local is not None:
        t = local
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def deferrable_storages(optimizers: list) -> Optional[set]:
    """Storages that change only inside ``optimizer.step()``: the parameters the optimizers
    update and their state, when every optimizer is a ``torch.optim.Optimizer`` (whose step
    hooks can wait for deferred copies). None when nothing can be deferred safely. Parameters
    no optimizer updates (frozen ones) are copied at once."""
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        return None
    keys = set()
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.numel() > 0:
                    keys.add(storage_key(p))
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.numel() > 0:
                    keys.add(storage_key(v))
    return keys


class Stager:
    """Copy nested state (dicts, lists, tensors, DTensors, ShardedTensors) into reused buffers.

    Args:
        pin_memory: pin buffers of CUDA sources (default: when CUDA is available).
    """

    def __init__(self, pin_memory: Optional[bool] = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._wrappers: dict[tuple, Any] = {}
        self._memo: dict[tuple, torch.Tensor] = {}
        self._async_cuda = False
        #: storage addresses whose copies ``stage`` may leave to :meth:`finish` (None: copy all now)
        self.defer: Optional[set] = None
        self._deferred: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ready: Any = None
        #: bytes of tensor data copied (or queued) by the last :meth:`stage`
        self.last_bytes = 0
        #: bytes of the last :meth:`stage` left to :meth:`finish`
        self.deferred_bytes = 0
        self._lock = threading.Lock()  # stage() waits for a reserve() running on another thread
        self._reserving = False

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the reusable buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def release(self) -> None:
        """Drop every buffer (the next ``stage`` allocates again)."""
        self._buffers.clear()
        self._wrappers.clear()

    @torch.no_grad()
    def reserve(self, tree: Any) -> int:
        """Allocate the buffers :meth:`stage` of this ``tree`` will copy into, without copying:
        pinned when the source is on a GPU, their pages faulted in otherwise. The first save then
        copies into warm memory (allocating and pinning several GiB took seconds of the first
        async save's stall). Meant for a background thread: :meth:`stage` waits for it. Returns
        the bytes allocated."""
        with self._lock:
            before = self.buffer_bytes
            self._memo = {}
            self._reserving = True
            try:
                self._stage(tree, ())
            finally:
                self._reserving = False
                self._memo = {}
            return self.buffer_bytes - before

    @torch.no_grad()
    def stage(self, tree: Any) -> Any:
        """A copy of ``tree`` whose tensors live in this stager's host buffers.

        The copy is complete when this returns (device-to-host copies are synchronised).
        """
        with self._lock:
            return self._stage_locked(tree)

    def _stage_locked(self, tree: Any) -> Any:
        self._memo = {}
        self._async_cuda = False
        self.last_bytes = 0
        self.deferred_bytes = 0
        self._deferred = []
        self._ready = None
        try:
            out = self._stage(tree, ())
            if self._async_cuda:
                torch.cuda.synchronize()
            if any(src.is_cuda for src, _ in self._deferred):
                # the deferred device-to-host copies must see every kernel queued so far (the
                # optimizer step that produced this state)
                self._ready = torch.cuda.Event()
                self._ready.record()
            return out
        finally:
            self._memo = {}

    @property
    def pending(self) -> bool:
        """Copies of the last :meth:`stage` are still to be made by :meth:`finish`."""
        return bool(self._deferred)

    @torch.no_grad()
    def finish(self) -> int:
        """Make the copies :meth:`stage` deferred (any thread); returns their bytes. When this
        returns the staged tree is complete."""
        deferred, self._deferred = self._deferred, []
        if not deferred:
            return 0
        cuda = [(src, buf) for src, buf in deferred if src.is_cuda]
        for src, buf in deferred:
            if not src.is_cuda:
                buf.copy_(src)
        if cuda:
            stream = torch.cuda.Stream(device=cuda[0][0].device)
            with torch.cuda.stream(stream):
                if self._ready is not None:
                    stream.wait_event(self._ready)
                for src, buf in cuda:
                    buf.copy_(src, non_blocking=buf.is_pinned())
            stream.synchronize()
        self._ready = None
        return sum(b.numel() * b.element_size() for _, b in deferred)

    # ------------------------------------------------------------------ internals
    def _stage(self, obj: Any, path: tuple) -> Any:
        if _is_dtensor(obj):
            return self._stage_dtensor(obj, path)
        if _is_sharded_tensor(obj):
            return self._stage_sharded(obj, path)
        if isinstance(obj, torch.Tensor):
            return self._stage_tensor(obj, path)
        if isinstance(obj, dict):
            items = [(k, self._stage(v, path + (k,))) for k, v in obj.items()]
            return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
        if isinstance(obj, list):
            return [self._stage(v, path + (i,)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(self._stage(v, path + (i,)) for i, v in enumerate(obj))
        return copy.deepcopy(obj)

    def _stage_tensor(self, t: torch.Tensor, path: tuple) -> torch.Tensor:
        t = t.detach()
        key = None
        if t.numel() > 0 and t.device.type != "meta":
            key = (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
            shared = self._memo.get(key)
            if shared is not None:
                return shared
        buf = self._buffers.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = self.pin_memory and t.is_cuda
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            if self._reserving and not pin:
                buf.zero_()  # fault the pages in now (pinning already does)
            self._buffers[path] = buf
        if self._reserving:
            if key is not None:
                self._memo[key] = buf
            return buf
        nbytes = buf.numel() * buf.element_size()
        if self.defer and t.numel() > 0 and storage_key(t) in self.defer:
            self._deferred.append((t, buf))
            self.deferred_bytes += nbytes
        else:
            non_blocking = t.is_cuda and buf.is_pinned()
            buf.copy_(t, non_blocking=non_blocking)
            self._async_cuda = self._async_cuda or non_blocking
        self.last_bytes += nbytes
        if key is not None:
            self._memo[key] = buf
        return buf

    def _stage_dtensor(self, t: Any, path: tuple) -> Any:
        local = self._stage_tensor(t._local_tensor, path + ("<local>",))
        wrapper = self._wrappers.get(path)
        if wrapper is None or wrapper.shape != t.shape or wrapper.placements != t.placements or wrapper.dtype != t.dtype:
            # One-time: a DTensor with the same spec around our buffer (no copy of the shard)
            wrapper = _dtensor_around(t, local)
            self._wrappers[path] = wrapper
        wrapper._local_tensor = local
        return wrapper

    def _stage_sharded(self, t: Any, path: tuple) -> Any:
        wrapper = self._wrappers.get(path)
        shards = t.local_shards()
        if wrapper is None or wrapper.size() != t.size() or len(wrapper.local_shards()) != len(shards):
            wrapper = copy.deepcopy(t) if t.device.type == "cpu" else t.to("cpu")
            self._wrappers[path] = wrapper
        for i, (dst, src) in enumerate(zip(wrapper.local_shards(), shards)):
            dst.tensor = self._stage_tensor(src.tensor, path + ("<shard>", i))
        return wrapper
