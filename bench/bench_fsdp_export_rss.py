"""Benchmark: host RSS growth per rank while exporting an FSDP2 model to HuggingFace safetensors.

Builds the same model (a tiny Llama from ``LlamaConfig``, or a plain MLP stack; no downloads)
on 2 CPU ranks (gloo), applies ``torch.distributed.fsdp.fully_shard`` and measures, per rank,
the peak host RSS growth during one export, for

* ``baseline``: ``get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
  cpu_offload=True))`` then ``safetensors.torch.save_file`` on rank 0;
* ``ours (5GB)``: ``CheckpointManager(CheckpointConfig(ckpt_path=..., export_path=...))
  .export_hf(step, Role("policy", model))`` with the default ``max_shard_size``;
* ``ours (64MB)``: the same with ``max_shard_size="64MB"`` (``--small-shard``).

Each method runs in a fresh pair of processes (``torch.multiprocessing.spawn``), so nothing
allocated by one method is still mapped during the next. Children run with
``MALLOC_MMAP_THRESHOLD_=131072`` so glibc returns freed tensor memory to the OS and RSS
tracks live memory. The peak is the larger of

* ``VmHWM`` from ``/proc/self/status`` after resetting it (``echo 5 > /proc/self/clear_refs``)
  right before the export (exact kernel high-water mark), and
* the maximum ``VmRSS`` seen by a thread sampling ``/proc/self/status`` every 2 ms
  (fallback where ``clear_refs`` is not writable),

minus ``VmRSS`` right before the export (model built and sharded, ``gc.collect()`` done).

Run from the repository root::

    python bench/bench_fsdp_export_rss.py                    # tiny Llama, ~300 MB fp32
    python bench/bench_fsdp_export_rss.py --size-mb 200 --model mlp
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MiB = 1 << 20
WORLD = 2
MMAP_THRESHOLD = "131072"
# Llama shape (fixed; the number of layers sets the size)
LLAMA = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8,
             vocab_size=32000, max_position_embeddings=256)
MLP_WIDTH = 2048


# --------------------------------------------------------------------------- RSS measurement
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak RSS (bytes) between ``start()`` and ``stop()``: kernel HWM and a 2 ms sampler."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.max_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_kib = max(self.max_kib, _status_kib("VmRSS"))
            self._stop.wait(self.interval)

    def start(self) -> None:
        gc.collect()
        self.base_kib = _status_kib("VmRSS")
        self.hwm_ok = _reset_hwm()
        self.max_kib = self.base_kib
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        sampled = max(self.max_kib, _status_kib("VmRSS"))
        hwm = _status_kib("VmHWM") if self.hwm_ok else -1
        peak = max(sampled, hwm)
        return {
            "base_mib": self.base_kib / 1024,
            "growth_mib": (peak - self.base_kib) / 1024,
            "sampled_growth_mib": (sampled - self.base_kib) / 1024,
            "hwm_growth_mib": (hwm - self.base_kib) / 1024 if self.hwm_ok else None,
        }


# --------------------------------------------------------------------------- model
def build_model(kind: str, layers: int):
    import torch
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    if kind == "llama":
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **LLAMA)
        model = AutoModelForCausalLM.from_config(cfg)
        blocks = list(model.model.layers)
    else:
        model = torch.nn.Sequential(*[torch.nn.Linear(MLP_WIDTH, MLP_WIDTH) for _ in range(layers)])
        blocks = list(model)
    for b in blocks:
        fully_shard(b)
    fully_shard(model)
    return model


def layers_for(kind: str, size_mb: float) -> int:
    target = size_mb * 1000**2 / 4  # fp32 parameters
    if kind == "llama":
        h, i, v = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["vocab_size"]
        per_layer = 4 * h * h + 3 * h * i + 2 * h
        fixed = 2 * v * h + h
    else:
        per_layer, fixed = MLP_WIDTH * MLP_WIDTH + MLP_WIDTH, 0
    return max(1, round((target - fixed) / per_layer))


def model_bytes(model) -> int:
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


# --------------------------------------------------------------------------- methods
def run_baseline(model, out_dir: str, rank: int) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    del sd


def make_ours(out_dir: str, max_shard_size):
    from skyrl_callbacks import CheckpointConfig, CheckpointManager
    from skyrl_callbacks.roles import Role

    manager = CheckpointManager(CheckpointConfig(ckpt_path=os.path.join(out_dir, "ckpt"),
                                                 export_path=os.path.join(out_dir, "export")))

    def run(model) -> None:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        manager.export_hf(1, Role("policy", model), **kwargs)

    return run


def _written_bytes(top: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(top):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files if f.endswith(".safetensors"))
    return total


def worker(rank: int, method: dict, opts: dict) -> None:
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)  # 2 ranks on a small shared machine
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(opts["port"])
    tdist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import warnings

        warnings.filterwarnings("ignore")
        model = build_model(opts["model"], opts["layers"])
        # import every module either method uses before measuring, so imports (tens of MiB of
        # code and data) do not count as export memory
        import safetensors.torch  # noqa: F401
        import torch.distributed.checkpoint.state_dict  # noqa: F401
        import skyrl_callbacks.manager  # noqa: F401
        import skyrl_callbacks.writers.fsdp  # noqa: F401
        import skyrl_callbacks.writers.hf  # noqa: F401
        nbytes = model_bytes(model)
        out_dir = os.path.join(opts["tmp"], method["key"])
        runner = None
        if method["kind"] == "ours":
            runner = make_ours(out_dir, method["max_shard_size"])
        tdist.barrier()
        meter = PeakRSS()
        meter.start()
        t0 = time.perf_counter()
        if runner is not None:
            runner(model)
        else:
            run_baseline(model, out_dir, rank)
        tdist.barrier()
        wall = time.perf_counter() - t0
        res = meter.stop()
        res.update(rank=rank, wall_s=wall, model_bytes=nbytes,
                   malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"))
        if rank == 0:
            res["written_bytes"] = _written_bytes(out_dir)
        with open(os.path.join(opts["tmp"], f"{method['key']}.rank{rank}.json"), "w") as fh:
            json.dump(res, fh)
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


# --------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("llama", "mlp"), default="llama")
    ap.add_argument("--size-mb", type=float, default=300.0, help="approximate fp32 model size in MB (default 300)")
    ap.add_argument("--small-shard", default="64MB", help="max_shard_size of the second 'ours' run (default 64MB)")
    ap.add_argument("--tmp", default=None, help="scratch dir (default: a new temp dir, removed afterwards)")
    args = ap.parse_args(argv)

    import torch.multiprocessing as mp

    # must be in the environment when the children start: glibc reads it at malloc init
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    tmp = args.tmp or tempfile.mkdtemp(prefix="bench-fsdp-export-")
    os.makedirs(tmp, exist_ok=True)
    layers = layers_for(args.model, args.size_mb)
    methods = [
        {"key": "baseline", "label": "baseline: get_model_state_dict + save_file", "kind": "baseline"},
        {"key": "ours_default", "label": "ours: export_hf (max_shard_size 5GB, default)", "kind": "ours",
         "max_shard_size": None},
        {"key": "ours_small", "label": f"ours: export_hf (max_shard_size {args.small_shard})", "kind": "ours",
         "max_shard_size": args.small_shard},
    ]
    print(f"model: {args.model}, {layers} layers; {WORLD} ranks, gloo, CPU, FSDP2 fully_shard; "
          f"children run with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (freed memory returns to the OS)", flush=True)
    results = {}
    try:
        for m in methods:
            opts = {"port": _free_port(), "tmp": tmp, "model": args.model, "layers": layers}
            t0 = time.perf_counter()
            mp.spawn(worker, args=(m, opts), nprocs=WORLD, join=True)
            per_rank = []
            for r in range(WORLD):
                with open(os.path.join(tmp, f"{m['key']}.rank{r}.json")) as fh:
                    per_rank.append(json.load(fh))
            results[m["key"]] = per_rank
            shutil.rmtree(os.path.join(tmp, m["key"]), ignore_errors=True)
            r0, r1 = per_rank
            print(f"  {m['key']}: done in {time.perf_counter() - t0:.1f} s (process start + build + export); "
                  f"rank0 base RSS {r0['base_mib']:.0f} MiB, sampled/HWM growth "
                  f"{r0['sampled_growth_mib']:.1f}/{r0['hwm_growth_mib']} MiB; "
                  f"written {r0['written_bytes'] / MiB:.1f} MiB; "
                  f"child MALLOC_MMAP_THRESHOLD_={r0['malloc_mmap_threshold']}", flush=True)
    finally:
        if args.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)

    size_mib = results["baseline"][0]["model_bytes"] / MiB
    base0 = results["baseline"][0]["growth_mib"]
    print(f"\nmodel size: {size_mib:.1f} MiB fp32 ({results['baseline'][0]['model_bytes'] / 1e6:.0f} MB); "
          f"peak RSS growth = max(VmHWM after clear_refs, 2 ms VmRSS samples) - VmRSS before export\n")
    header = "| method | wall s | rank0 peak RSS growth MiB | rank1 peak RSS growth MiB | rank0 growth / model size | rank0 ratio vs baseline |"
    print(header)
    print("|---|---|---|---|---|---|")
    for m in methods:
        r0, r1 = results[m["key"]]
        ratio = r0["growth_mib"] / base0 if base0 > 0 else float("nan")
        print(f"| {m['label']} | {r0['wall_s']:.2f} | {r0['growth_mib']:.1f} | {r1['growth_mib']:.1f} | "
              f"{r0['growth_mib'] / size_mib:.2f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
