"""End-to-end cost of checkpointing a Lightning training run (issue 20).

One process, one machine: a Llama-shaped causal LM built from a config (no download:
``LlamaConfig`` + ``AutoModelForCausalLM.from_config``; ~1B parameters on a GPU, a tiny one with
``--cpu``), AdamW (fused on CUDA), bf16 autocast on CUDA, random token batches, real forward and
backward. Each mode trains the same number of steps and times a window of them:

* ``none``               no checkpointing (the baseline; run first, and again last with ``--baseline-twice``)
* ``ours sync``          ``SkyRLCheckpoint``, blocking save every N steps
* ``ours async``         ``async_save=True``
* ``ours async overlap`` ``async_save=True, async_overlap_copy=True``
* ``lightning``          Lightning's ``ModelCheckpoint(every_n_train_steps=N)`` with its default IO (``torch.save``)
* ``lightning async``    the same with ``AsyncCheckpointIO``
* ``dcp async``          ``torch.distributed.checkpoint.async_save`` of the model and optimizer state every N steps

Window: steps ``N`` .. ``(k+1)N - 1`` (warm-up first: the first optimizer step allocates the optimizer
state and our ``prewarm`` pins the staging buffers), which holds the k saves at steps ``N .. kN``;
at the end of the window the last save's write must be finished (modes with a write in flight wait for
it inside the window), so every save's full cost is inside. N is chosen so the background write fits
between two saves: ``N = ceil(1.5 * write_s / step_s)``, with ``write_s`` the state bytes over a measured
raw ``fsync``'d write speed of this disk and ``step_s`` the baseline's step time (or ``--every N``).

Columns: ``steps/s`` (window steps / window seconds), ``overhead %`` (window time vs the no-checkpoint
baseline, same steps), ``lost/save s`` (extra window seconds per save: what a save really costs the
run), ``blocked/save s`` (median foreground time of the save call, plus for the overlap mode the
optimizer step's wait for the deferred copy), ``first save blocked s``, ``peak RSS +GiB`` and ``peak GPU
+GiB`` (peaks of the mode above the baseline's). Lightning's ``torch.save`` and DCP do not fsync
(ours does: the save is durable when committed); the bench leaves them as users get them.

    python bench/bench_training.py                   # GPU, ~1B parameters
    python bench/bench_training.py --cpu             # CPU, small model (CI-sized, ~2 minutes on 2 cores)
    python bench/bench_training.py --cpu --tiny --modes none "ours async overlap" --out r.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

MODES = ["none", "ours sync", "ours async", "ours async overlap", "lightning", "lightning async", "dcp async"]
GIB = 1024 ** 3

# model presets: (hidden, intermediate, layers, heads, kv heads, vocab, seq, batch)
PRESETS = {
    # ~1.0B parameters (TinyLlama-shaped, 20 layers)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, seq=2048, batch=8),
    # CPU: ~13M parameters, a few steps per second on one core
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=8192, seq=128, batch=4),
    # smoke test: under a second per mode
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, seq=32, batch=2),
}


# --------------------------------------------------------------------------- memory
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.bench_save import reset_peak_rss  # noqa: E402


def rss_bytes(field: str = "VmHWM") -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Peak RSS of this process during a mode: the kernel's high-water mark when it can be reset
    (``/proc/self/clear_refs``), else the current RSS sampled every 10 ms."""

    def __init__(self) -> None:
        self.hwm = reset_peak_rss()
        self.peak = rss_bytes("VmRSS")
        self._stop = threading.Event()
        self._thread = None
        if not self.hwm:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes("VmRSS"))

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return rss_bytes("VmHWM") if self.hwm else self.peak


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:  # pinned blocks freed by a mode go back to the OS
            empty_host()


# --------------------------------------------------------------------------- model and data
def build(preset: dict, device: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=preset["hidden_size"], intermediate_size=preset["intermediate_size"],
        num_hidden_layers=preset["num_hidden_layers"], num_attention_heads=preset["num_attention_heads"],
        num_key_value_heads=preset["num_key_value_heads"], vocab_size=preset["vocab_size"],
        max_position_embeddings=max(2048, preset["seq"]), tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model


class RandomTokens:
    """Map-style dataset of random token rows (deterministic per index); cheap to produce."""

    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch

        g = torch.Generator().manual_seed(1000 + int(i))
        return torch.randint(0, self.vocab, (self.seq,), generator=g)


def make_module(model, fused: bool):
    import lightning.pytorch as pl
    import torch

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.policy = model  # SkyRLCheckpoint's default role attribute

        def training_step(self, batch, batch_idx):
            return self.policy(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.policy.parameters(), lr=1e-5, fused=fused)

    return LM()


def state_bytes(model) -> int:
    """Bytes of weights + AdamW exp_avg/exp_avg_sq (fp32): what a save writes."""
    return sum(p.numel() * p.element_size() * 3 for p in model.parameters())


def disk_write_gbps(directory: str, nbytes: int) -> float:
    """A single stream of ``nbytes`` with 8 MiB writes and fsync: this disk's write speed."""
    path = os.path.join(directory, "probe.bin")
    chunk = bytearray(os.urandom(1 << 20)) * 8
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        done = 0
        while done < nbytes:
            fh.write(chunk)
            done += len(chunk)
        os.fsync(fh.fileno())
    dt = time.perf_counter() - t0
    os.unlink(path)
    return done / dt / 1e9


def pinned_copy_s(model, cuda: bool) -> float:
    """Seconds to copy the state's bytes (weights and two AdamW moments, i.e. each parameter three
    times) into warm host buffers, pinned on CUDA: the floor of any snapshot (second of two copies)."""
    import torch

    tensors = [p.detach() for p in model.parameters()] * 3
    bufs = [torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=cuda) for t in tensors]
    best = float("inf")
    for _ in range(2):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b, t in zip(bufs, tensors):
            b.copy_(t, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del bufs
    release_memory()
    return best


# --------------------------------------------------------------------------- timing
class Timer:
    """The window's clock (synchronised with the GPU at both ends) and the foreground time of the
    checkpoint hooks, per step."""

    def __init__(self, start_step: int, end_step: int, every: int, cuda: bool, finish=None) -> None:
        self.start_step, self.end_step, self.every, self.cuda = start_step, end_step, every, cuda
        self.finish = finish  # waits for a save in flight at the end of the window
        self.t0: Optional[float] = None
        self.t1: Optional[float] = None
        self.end_wait = 0.0
        self.hook_s: dict[int, float] = {}
        self.marks: list = []  # (step, time at the start of its on_train_batch_end), unsynchronised
        self.step = 0

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def callback(self):
        import lightning.pytorch as pl

        timer = self

        class _Window(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                timer.step = trainer.global_step + 1

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                step = trainer.global_step
                timer.marks.append((step, time.perf_counter()))
                if step == timer.start_step:
                    timer.sync()
                    timer.t0 = time.perf_counter()
                elif step == timer.end_step:
                    timer.sync()
                    t = time.perf_counter()
                    if timer.finish is not None:
                        timer.finish(trainer)
                    timer.end_wait = time.perf_counter() - t
                    timer.t1 = time.perf_counter()

        return _Window()

    def wrap(self, obj: Any, name: str, save_hook: bool) -> None:
        """Time ``obj.name`` (a hook) into the step it runs in. ``save_hook``: the time belongs to
        the step's save; otherwise (the optimizer-step wait) to the last save."""
        fn = getattr(obj, name)
        timer = self

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                step = timer.step
                if not save_hook:
                    step = (step - 1) // timer.every * timer.every  # the save whose copy it waited for
                timer.hook_s[step] = timer.hook_s.get(step, 0.0) + dt

        setattr(obj, name, timed)

    def save_blocked(self) -> list[float]:
        return [self.hook_s.get(s, 0.0) for s in range(self.every, self.end_step + 1, self.every)
                if s > self.start_step - self.every + 1 and s <= self.end_step]

    def idle_hook_s(self) -> float:
        """Median hook time at steps that do not save (polling): subtracted from the save steps."""
        vals = [v for s, v in self.hook_s.items() if s % self.every and self.start_step < s <= self.end_step]
        return statistics.median(vals) if vals else 0.0


def run_mode(mode: str, module, args, every: int, workdir: str, cuda: bool) -> dict:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from skyrl_callbacks import SkyRLCheckpoint

    start, end = every, (args.saves + 1) * every - 1
    ckpt_dir = os.path.join(workdir, mode.replace(" ", "_"))
    os.makedirs(ckpt_dir, exist_ok=True)
    callbacks: list = []
    plugins: list = []
    finish = None
    skyrl = mcb = None
    dcp_cb = None
    if mode.startswith("ours"):
        cfg = dict(ckpt_path=ckpt_dir, export_path=ckpt_dir.rstrip("/") + "_exports", ckpt_interval=every,
                   async_save=mode != "ours sync", async_overlap_copy=mode == "ours async overlap",
                   save_on_train_end=False, preemption_signals=[], run_lock=False)
        skyrl = SkyRLCheckpoint(cfg)
        callbacks.append(skyrl)

        def finish(trainer):  # noqa: F811 - the write of the last save belongs to the window
            if skyrl.manager is not None:
                skyrl.manager.wait()
    elif mode.startswith("lightning"):
        from lightning.pytorch.callbacks import ModelCheckpoint

        mcb = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1, save_last=False)
        callbacks.append(mcb)
        if mode == "lightning async":
            from lightning.pytorch.plugins.io import AsyncCheckpointIO

            plugins.append(AsyncCheckpointIO())

            def finish(trainer):  # noqa: F811
                ex = getattr(trainer.strategy.checkpoint_io, "_executor", None)
                if ex is not None:
                    ex.shutdown(wait=True)
                    trainer.strategy.checkpoint_io._executor = None
    elif mode == "dcp async":
        ensure_process_group()
        dcp_cb = _dcp_callback_class()(ckpt_dir, every)
        callbacks.append(dcp_cb)

        def finish(trainer):  # noqa: F811
            dcp_cb.wait()
    timer = Timer(start, end, every, cuda, finish)
    callbacks.insert(0, timer.callback())
    if skyrl is not None:
        timer.wrap(skyrl, "on_train_batch_end", True)
        timer.wrap(skyrl, "on_before_optimizer_step", False)
    if mcb is not None:
        timer.wrap(mcb, "on_train_batch_end", True)
    if dcp_cb is not None:
        timer.wrap(dcp_cb, "on_train_batch_end", True)
    steps = end  # no step after the window: step (k+1)N would save again, outside it
    loader = DataLoader(RandomTokens(steps * args.batch, args.seq, args.vocab), batch_size=args.batch,
                        num_workers=0, shuffle=False, pin_memory=cuda)
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
        max_steps=steps, logger=False, enable_checkpointing=mcb is not None, callbacks=callbacks,
        plugins=plugins or None, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=ckpt_dir,
    )
    release_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss = RssSampler()
    t_fit = time.perf_counter()
    trainer.fit(module, loader)
    fit_s = time.perf_counter() - t_fit
    peak_rss = rss.stop()
    peak_gpu = torch.cuda.max_memory_allocated() if cuda else 0
    if timer.t0 is None or timer.t1 is None:
        raise RuntimeError(f"{mode}: the timing window [{start}, {end}] was not reached")
    idle = timer.idle_hook_s()
    blocked = [max(0.0, b - idle) for b in timer.save_blocked()]
    files = sum(len(fs) for _d, _s, fs in os.walk(ckpt_dir))
    del trainer
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    os.sync()
    release_memory()
    window = timer.t1 - timer.t0
    n_saves = 0 if mode == "none" else args.saves
    return {
        "mode": mode, "window_steps": end - start, "window_s": window, "steps_per_s": (end - start) / window,
        "saves": n_saves, "blocked_per_save_s": statistics.median(blocked) if blocked and n_saves else 0.0,
        "first_save_blocked_s": blocked[0] if blocked and n_saves else 0.0, "end_wait_s": timer.end_wait,
        "peak_rss": peak_rss, "peak_gpu": peak_gpu, "fit_s": fit_s, "files": files,
        # per step of the window: seconds from the previous step's end hook to this one's (host clock)
        "step_s": {s: round(t - t_prev, 4) for (s, t), (_sp, t_prev) in zip(timer.marks[1:], timer.marks)
                   if start < s <= end},
    }


class _DcpAsync:
    """``dcp.async_save`` of the model and optimizer every N steps (waits for the previous one first)."""

    def __init__(self, directory: str, every: int) -> None:
        self.directory, self.every, self.future = directory, every, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every:
            return
        import torch.distributed.checkpoint as dcp

        self.wait()
        sd = {"model": pl_module.policy.state_dict(), "optimizer": trainer.optimizers[0].state_dict()}
        writer = dcp.FileSystemWriter(os.path.join(self.directory, f"step_{step}"))
        self.future = dcp.async_save(sd, storage_writer=writer)

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()
            self.future = None


def _dcp_callback_class():
    import lightning.pytorch as pl

    class DcpAsync(_DcpAsync, pl.Callback):
        pass

    return DcpAsync


def ensure_process_group() -> None:
    """``dcp.async_save`` needs a process group; one process gets a gloo group of one."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


# --------------------------------------------------------------------------- report
def aggregate(runs: list[dict]) -> dict:
    """One row per mode over the rounds: medians of the times, maxima of the memory peaks."""
    row = dict(runs[0])
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    for k in ("window_s", "blocked_per_save_s", "first_save_blocked_s", "end_wait_s", "fit_s"):
        row[k] = med(k)
    row["steps_per_s"] = row["window_steps"] / row["window_s"]
    row["peak_rss"] = max(r["peak_rss"] for r in runs)
    row["peak_gpu"] = max(r["peak_gpu"] for r in runs)
    row["rounds"] = [{k: r[k] for k in ("window_s", "blocked_per_save_s", "first_save_blocked_s", "end_wait_s")}
                     for r in runs]
    return row


def table(rows: list[dict], base: dict, pinned_s: float) -> str:
    out = ["| mode | steps/s | overhead % | lost/save s | blocked/save s | blocked / pinned copy | first save blocked s | "
           "end wait s | peak RSS +GiB | peak GPU +GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    per_step = base["window_s"] / base["window_steps"]
    for r in rows:
        ref = per_step * r["window_steps"]
        over = (r["window_s"] / ref - 1) * 100
        lost = (r["window_s"] - ref) / r["saves"] if r["saves"] else 0.0
        r.update(overhead_pct=over, lost_per_save_s=lost)
        dash = r["mode"] == "none" and r is base
        out.append(
            f"| {r['mode']} | {r['steps_per_s']:.3f} | {'-' if dash else f'{over:+.1f}'} | "
            f"{'-' if not r['saves'] else f'{lost:.3f}'} | {'-' if not r['saves'] else '%.3f' % r['blocked_per_save_s']} | "
            f"{'-' if not r['saves'] else '%.2f' % (r['blocked_per_save_s'] / pinned_s)} | "
            f"{'-' if not r['saves'] else '%.3f' % r['first_save_blocked_s']} | {r['end_wait_s']:.3f} | "
            f"{(r['peak_rss'] - base['peak_rss']) / GIB:+.2f} | {(r['peak_gpu'] - base['peak_gpu']) / GIB:+.2f} |"
        )
    return "\n".join(out)


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU, small model (CI-sized)")
    p.add_argument("--tiny", action="store_true", help="the smallest model (smoke test)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model preset (default: 1b, cpu with --cpu)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    p.add_argument("--every", type=int, default=None, help="save every N steps (default: chosen, see the docstring)")
    p.add_argument("--saves", type=int, default=2, help="saves inside the timed window (k)")
    p.add_argument("--rounds", type=int, default=1, help="run every mode this many times, interleaved; medians")
    p.add_argument("--baseline-twice", action="store_true",
                   help="run the baseline again at the end of each round (median of all baseline runs)")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: the system temp dir)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (CPU; default: all cores but one, left to the checkpoint writer)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        p.error("no CUDA device: pass --cpu")
    preset = dict(PRESETS[args.preset or ("tiny" if args.tiny else "cpu" if args.cpu else "1b")])
    if args.layers:
        preset["num_hidden_layers"] = args.layers
    args.batch = args.batch or preset["batch"]
    args.seq = args.seq or preset["seq"]
    preset["seq"] = args.seq
    args.vocab = preset["vocab_size"]
    if not cuda:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401 - its loggers exist now

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "skyrl_callbacks"):
        logging.getLogger(name).setLevel(logging.ERROR)

    device = "cuda" if cuda else "cpu"
    model = build(preset, device)
    module = make_module(model, fused=cuda)
    n_params = sum(p.numel() for p in model.parameters())
    sbytes = state_bytes(model)
    workdir = tempfile.mkdtemp(prefix="skyrl-bench-training-", dir=args.dir)
    env = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu x{os.cpu_count()} (torch threads {torch.get_num_threads()})",
        "torch": torch.__version__, "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "params": n_params, "state_bytes": sbytes, "batch": args.batch, "seq": args.seq, "preset": preset, "dir": workdir,
    }
    print(f"[bench_training] {env['device']}, torch {env['torch']}: {n_params / 1e6:.1f}M parameters, "
          f"{sbytes / GIB:.2f} GiB of state (fp32 weights + AdamW), batch {args.batch} x {args.seq} tokens", flush=True)
    try:
        baseline_modes = ["none"] + (["none"] if args.baseline_twice else [])
        every = args.every
        if every is None:
            # calibrate: the baseline at a provisional N gives the step time; the disk probe the write speed
            probe = min(sbytes, 1 * GIB) if cuda else min(sbytes, 256 << 20)
            gbps = disk_write_gbps(workdir, max(probe, 8 << 20))
            # a short no-checkpoint run for the step time (its own warm-up: 3 steps)
            base_probe = run_mode("none", module, _with(args, saves=1), 4, workdir, cuda)
            step_s = base_probe["window_s"] / base_probe["window_steps"]
            write_s = sbytes / (gbps * 1e9)
            every = max(3, math.ceil(1.5 * write_s / step_s))
            print(f"[bench_training] N = {every}: step {step_s:.3f} s, disk {gbps:.2f} GB/s, state write "
                  f"{write_s:.2f} s -> ceil(1.5 * {write_s:.2f} / {step_s:.3f})", flush=True)
            env.update(calibration={"step_s": step_s, "disk_gbps": gbps, "write_s": write_s})
        else:
            print(f"[bench_training] N = {every} (--every)", flush=True)
        env["every"] = every
        env["pinned_copy_s"] = pinned_copy_s(model, cuda)
        print(f"[bench_training] copy of the state into warm {'pinned ' if cuda else ''}host buffers: "
              f"{env['pinned_copy_s']:.3f} s", flush=True)
        modes = [m for m in args.modes if m != "none"]
        order = ["none"] + modes + baseline_modes[1:]  # the baseline always runs, first
        runs: dict[str, list] = {}
        for rnd in range(args.rounds):
            for mode in order:
                t = time.perf_counter()
                row = run_mode(mode, module, args, every, workdir, cuda)
                runs.setdefault(mode, []).append(row)
                print(f"[bench_training] round {rnd + 1} {mode}: {row['steps_per_s']:.3f} steps/s, window "
                      f"{row['window_s']:.2f} s ({row['window_steps']} steps, {row['saves']} saves), "
                      f"fit {time.perf_counter() - t:.1f} s", flush=True)
        rows = [aggregate(runs[m]) for m in dict.fromkeys(order)]
        base = rows[0]
        md = table(rows, base, env["pinned_copy_s"])
        print(f"\nN = {every}, window {base['window_steps']} steps with {args.saves} saves, {args.rounds} round(s) "
              f"(medians), "
              f"{sbytes / GIB:.2f} GiB of state, {env['device']}\n")
        print(md, flush=True)
        result = {"env": env, "rows": rows, "markdown": md}
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1, default=str)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _with(args, **kw):
    ns = argparse.Namespace(**vars(args))
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


if __name__ == "__main__":
    main()
