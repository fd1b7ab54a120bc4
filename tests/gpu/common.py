"""Shared helpers of the GPU scripts in ``tests/gpu/`` (run with torchrun, NCCL on GPUs or gloo on CPU).

Every script reports checks as lines ``[gpu] PASS name: detail`` / ``[gpu] FAIL name: detail`` on
stdout (rank 0, unless a check is per rank) and appends them as JSON lines to ``$GPU_RESULTS``
when that is set; ``run_all.sh`` collects them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for p in (REPO, os.path.join(REPO, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

# the tiny Llama of the brief (no download: built from a config)
LLAMA = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=1024, max_position_embeddings=128)
LR = 1e-3
#: eager attention: a deterministic backward (no flash / memory-efficient SDPA kernels)
ATTN = "eager"


def base_parser(doc: str = "") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--work", required=True)
    return ap


# --------------------------------------------------------------------------- process group
def init(backend: str, device: str) -> torch.device:
    """Init the default process group from torchrun's env; returns this rank's device."""
    import torch.distributed as tdist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        torch.set_num_threads(1)
        dev = torch.device("cpu")
    if not tdist.is_initialized():
        kwargs = {"device_id": dev} if device == "cuda" else {}
        tdist.init_process_group(backend, timeout=timedelta(seconds=120), **kwargs)
    return dev


def finish_pg() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        try:
            tdist.barrier()
        finally:
            tdist.destroy_process_group()


def rank() -> int:
    import torch.distributed as tdist

    return tdist.get_rank() if tdist.is_initialized() else 0


# --------------------------------------------------------------------------- reporting
def report(name: str, ok: bool, detail: str = "", *, all_ranks: bool = False) -> bool:
    """Print one PASS/FAIL line (rank 0 only unless ``all_ranks``) and append it to $GPU_RESULTS."""
    r = rank()
    if r != 0 and not all_ranks:
        return ok
    tag = f"{name}[rank{r}]" if all_ranks else name
    line = f"[gpu] {'PASS' if ok else 'FAIL'} {tag}: {detail}"
    print(line, flush=True)
    path = os.environ.get("GPU_RESULTS")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"name": tag, "ok": bool(ok), "detail": str(detail)[:2000]}) + "\n")
    return ok


def info(msg: str) -> None:
    if rank() == 0:
        print(f"[gpu] INFO {msg}", flush=True)


def guarded(name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; an exception becomes a FAIL line (on the rank that raised) instead of a crash."""
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        report(name, False, "exception: " + "".join(traceback.format_exception(exc))[-1500:].replace("\n", " | "),
               all_ranks=True)
        return None


# --------------------------------------------------------------------------- models
def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(LLAMA)
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_llama(seed: int, device: torch.device, *, shard: bool = True, cfg=None, init_on_device: bool = False):
    """Tiny Llama from a config (no download); ``fully_shard`` per decoder layer and on the root."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = cfg or llama_config()
    if init_on_device:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN)
    else:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN).to(device)
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def make_role(model, lr: float = LR, **adamw):
    from skyrl_callbacks.roles import Role

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, **adamw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return Role(name="policy", model=model, optimizers=[opt], schedulers=[sched])


def batch(step: int, r: int, device: torch.device, vocab: int = LLAMA["vocab_size"], bs: int = 4, seq: int = 64):
    g = torch.Generator().manual_seed(1000 + 17 * step + r)
    return torch.randint(0, vocab, (bs, seq), generator=g).to(device)


def train(role, steps: int, device: torch.device, start: int = 0) -> list[float]:
    """``steps`` optimizer steps; each rank its own batch (as in real data-parallel training)."""
    losses = []
    for step in range(start, start + steps):
        ids = batch(step, rank(), device)
        loss = role.model(input_ids=ids, labels=ids).loss
        loss.backward()
        for opt in role.optimizers:
            opt.step()
            opt.zero_grad()
        for s in role.schedulers:
            s.step()
        losses.append(float(loss.detach()))
    return losses


def eval_ids(device: torch.device, vocab: int = LLAMA["vocab_size"]):
    g = torch.Generator().manual_seed(99)
    return torch.randint(0, vocab, (2, 32), generator=g).to(device)


# --------------------------------------------------------------------------- gathering / comparing
def gathered_state(role) -> dict:
    """Full model + FQN-keyed optimizer + scheduler state on rank 0 (CPU), via torch's DSD API
    (not the writer's code path); {} on other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(role.model, role.optimizers,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() != 0:
        return {}
    return {"model": msd, "optim": osd, "sched": [s.state_dict() for s in role.schedulers]}


def diff(a, b, path: str = "") -> list[str]:
    """Bitwise differences between two nested states ([] when equal)."""
    from fsdp_worker import diff as _diff  # tests/fsdp_worker.py (CPU test helper)

    return _diff(a, b, path)


def max_abs_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for k in a:
        if k in b and isinstance(a[k], torch.Tensor) and a[k].shape == b[k].shape and a[k].is_floating_point():
            worst = max(worst, float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0)
    return worst


def compare(name: str, got: dict, ref: dict, extra: str = "") -> bool:
    if rank() != 0:
        return True
    problems = diff(got, ref)
    n_t = sum(1 for _ in _tensors(got))
    if n_t == 0 or n_t != sum(1 for _ in _tensors(ref)):
        problems = problems or [f"{n_t} tensors loaded, {sum(1 for _ in _tensors(ref))} in the reference"]
    detail = f"{n_t} tensors bitwise equal" if not problems else "; ".join(problems[:6])
    return report(name, not problems, (detail + (f"; {extra}" if extra else "")))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def nbytes_of_model(model) -> int:
    """Bytes of the full (unsharded) parameters and buffers."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.numel() * t.element_size()  # DTensor.numel() is the global size
    return total


# --------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Samples this process's RSS every ``interval`` s in a thread; ``peak`` - ``start`` is the growth."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def all_gather_obj(obj: Any) -> list:
    import torch.distributed as tdist

    if not tdist.is_initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out
