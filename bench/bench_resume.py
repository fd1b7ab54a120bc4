"""Time to resume after a crash: process start -> first training step (issue 20).

A checkpoint of the same Llama-shaped model as ``bench/bench_training.py`` (weights + AdamW state) is
saved once with ``CheckpointManager``, locally and (``--s3``) on a moto S3 server that this bench starts on
127.0.0.1. Then, per round, the page cache of the checkpoint is dropped (``echo 3 >
/proc/sys/vm/drop_caches`` when permitted, else ``posix_fadvise(DONTNEED)`` per file) and a **fresh
process** resumes it, timing:

* ``start``      interpreter start + imports (from the parent's clock just before it spawns the child)
* ``build``      the model on the device and the optimizer (what any restart pays, checkpoint or not)
* ``find``       ``resume_candidates()``: list the committed checkpoints, read the pointer
* ``verify``     ``verify(path, checksums=True)``: the manifest's xxh3 checksums of every file
                 (``verify_on_resume=True``; the default checks the manifest's sizes, inside ``load``)
* ``read+load``  ``load()`` from a cold cache (local: the files are evicted again after ``verify``, whose read
                 warmed them; that eviction is not counted): the size check, then the files read straight into the model's parameters and the
                 optimizer's state (the plain writer reads into the destinations: reading and loading are one
                 pass, not two; on S3 this includes the download)
* ``first step`` one forward/backward/optimizer step (synchronised)

Against: a **cold raw read of the same bytes** (local: one stream, 8 MiB reads, after the same cache drop)
and a **raw parallel ``s3fs`` get** of the same objects (S3: ``fs.get`` of every object of the step
directory, fsspec's concurrent batch). ``x raw`` = raw seconds / our ``read+load`` seconds (goal >= 0.9x);
``x raw (find..load)`` also counts find and verify.

The child also records every object the S3 resume fetches (``s3fs``'s ``_cat_file``/``_get_file``: the
object and the interval) to check that the rank fetches only its own objects, and how many at once.
Page cache: ``--drop-caches`` (the GPU session) drops the whole machine's cache (root only); the default
evicts only the checkpoint's files (``posix_fadvise``), which leaves other users of a shared machine alone.

    python bench/bench_resume.py                       # GPU, ~1B parameters, local disk
    python bench/bench_resume.py --cpu --s3            # CPU, small model, local disk and moto S3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

GIB = 1024 ** 3
CHUNK = 8 << 20


# --------------------------------------------------------------------------- page cache
def drop_caches(paths: list[str], global_drop: bool = False) -> str:
    """Evict ``paths`` from the page cache; returns how ("drop_caches" or "fadvise")."""
    for p in paths:  # dirty pages cannot be dropped: write them first
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        if not global_drop:
            raise PermissionError("not asked for")
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def files_under(d: str) -> list[str]:
    return sorted(os.path.join(a, f) for a, _s, fs in os.walk(d) for f in fs)


def raw_read(paths: list[str]) -> float:
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def fingerprint(params) -> list:
    """sha1 of the bytes of the first and last parameter (bitwise, independent of reduction order)."""
    import hashlib

    return [hashlib.sha1(p.detach().cpu().contiguous().view(-1).view(torch_uint8()).numpy().tobytes()).hexdigest()
            for p in (params[0], params[-1])]


def torch_uint8():
    import torch

    return torch.uint8


# --------------------------------------------------------------------------- the resuming child
def child(args) -> None:
    t_imports0 = time.time()
    import torch

    import bench_training as bt
    from skyrl_callbacks import CheckpointManager
    from skyrl_callbacks.roles import Role

    out: dict = {"t_spawn": args.t_spawn, "t_main": t_imports0}
    downloads: list = []
    if args.ckpt_path.startswith("s3://"):
        import s3fs

        # every object body the resume fetches (whole-object GETs into memory or a file), with its interval
        for name in ("_cat_file", "_get_file"):
            real = getattr(s3fs.S3FileSystem, name)

            async def recorded(self, path, *a, _real=real, _name=name, **kw):
                t0 = time.perf_counter()
                try:
                    return await _real(self, path, *a, **kw)
                finally:
                    downloads.append({"object": str(path), "call": _name, "t0": t0, "t1": time.perf_counter()})

            setattr(s3fs.S3FileSystem, name, recorded)
    t = time.time()
    out["start_s"] = t - args.t_spawn
    cuda = not args.cpu
    device = "cuda" if cuda else "cpu"
    preset = json.loads(args.preset)
    t0 = time.perf_counter()
    model = bt.build(preset, device, seed=1)  # other weights than the saved ones: the load must replace them
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    if cuda:
        torch.cuda.synchronize()
    out["build_s"] = time.perf_counter() - t0
    cfg = dict(ckpt_path=args.ckpt_path, run_lock=False, verify_on_resume=False, preemption_signals=[])
    if args.storage_options:
        cfg["storage_options"] = json.loads(args.storage_options)
    mgr = CheckpointManager(cfg)
    roles = [Role(name="policy", model=model, optimizers=[opt])]
    t0 = time.perf_counter()
    candidates = mgr.resume_candidates()
    out["find_s"] = time.perf_counter() - t0
    path = candidates[0]
    t0 = time.perf_counter()
    problems = mgr.verify(path, checksums=True) if args.verify else []
    out["verify_s"] = time.perf_counter() - t0
    if problems:
        raise SystemExit(f"verification failed: {problems}")
    if args.verify and not args.ckpt_path.startswith("s3://"):
        # the verification read the files into the page cache: the load is timed cold, like the raw read
        t0 = time.perf_counter()
        drop_caches(files_under(path), args.drop_caches)
        out["drop_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = mgr.load(roles, path)
    if cuda:
        torch.cuda.synchronize()
    out["load_s"] = time.perf_counter() - t0
    out["step"] = state.step
    # the loaded weights are the saved ones (bitwise, the first and last parameter)
    ps = list(model.parameters())
    out["check"] = fingerprint(ps)
    out["opt_state_tensors"] = sum(1 for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    t0 = time.perf_counter()
    batch = torch.randint(0, preset["vocab_size"], (args.batch, preset["seq"]), device=device,
                          generator=torch.Generator(device).manual_seed(0))
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    out["first_step_s"] = time.perf_counter() - t0
    out["t_first_step"] = time.time()
    out["total_s"] = out["t_first_step"] - args.t_spawn - out.get("drop_s", 0.0)
    out["downloads"] = downloads
    mgr.close()
    with open(args.child_out, "w") as fh:
        json.dump(out, fh)


def concurrency(downloads: list) -> int:
    """Most object GETs in flight at one moment."""
    events = []
    for d in downloads:
        events += [(d["t0"], 1), (d["t1"], -1)]
    cur = peak = 0
    for _t, n in sorted(events, key=lambda e: (e[0], e[1])):
        cur += n
        peak = max(peak, cur)
    return peak


# --------------------------------------------------------------------------- parent
def save_checkpoint(args, preset: dict, ckpt_path: str, storage_options: Optional[dict]) -> tuple[int, str]:
    import torch

    import bench_training as bt
    from skyrl_callbacks import CheckpointManager
    from skyrl_callbacks.roles import Role

    cuda = not args.cpu
    device = "cuda" if cuda else "cpu"
    model = bt.build(preset, device, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    batch = torch.randint(0, preset["vocab_size"], (args.batch, preset["seq"]), device=device)
    for _ in range(2):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    cfg = dict(ckpt_path=ckpt_path, run_lock=False, preemption_signals=[])
    if storage_options:
        cfg["storage_options"] = storage_options
    mgr = CheckpointManager(cfg)
    res = mgr.save(2, [Role(name="policy", model=model, optimizers=[opt])], trainer_state={"global_step": 2})
    nbytes = res.bytes
    mgr.close()
    del mgr
    ps = list(model.parameters())
    check = fingerprint(ps)
    del model, opt, res
    if cuda:
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()  # the save's pinned staging buffers
    return nbytes, json.dumps(check)


def run_child(args, preset: dict, ckpt_path: str, storage_options: Optional[dict], work: str) -> dict:
    out = os.path.join(work, "child.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--ckpt-path", ckpt_path, "--child-out", out,
           "--preset", json.dumps(preset), "--batch", str(args.batch)]
    if args.cpu:
        cmd.append("--cpu")
    cmd.append("--verify" if args.verify else "--no-verify")
    if args.drop_caches:
        cmd.append("--drop-caches")
    if storage_options:
        cmd += ["--storage-options", json.dumps(storage_options)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t_spawn = time.time()
    proc = subprocess.run(cmd + ["--t-spawn", repr(t_spawn)], capture_output=True, text=True, timeout=args.child_timeout,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"resume child failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    with open(out) as fh:
        return json.load(fh)


def s3_raw_get(storage_options: dict, step_dir: str, local: str) -> float:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **{k: v for k, v in storage_options.items() if k != "endpoint_url"},
                           client_kwargs={"endpoint_url": storage_options["endpoint_url"]})
    objs = [p for p in fs.find(step_dir.replace("s3://", ""))]
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(local)
    dests = [os.path.join(local, f"{i}") for i in range(len(objs))]
    t0 = time.perf_counter()
    fs.get(objs, dests)  # fsspec's concurrent batch (s3fs gathers the GETs)
    return time.perf_counter() - t0


def row_md(name: str, rows: list[dict], raw: list[float], raw_name: str) -> str:
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    load = med("load_s")
    fl = med("find_s") + med("verify_s") + load
    rawm = statistics.median(raw)
    return (f"| {name} | {med('start_s'):.2f} | {med('build_s'):.2f} | {med('find_s'):.3f} | {med('verify_s'):.2f} | "
            f"{load:.2f} | {med('first_step_s'):.2f} | **{med('total_s'):.2f}** | {raw_name} {rawm:.2f} | "
            f"**{rawm / load:.2f}** | {rawm / fl:.2f} |")


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--preset", default=None, help="bench_training preset (default: 1b, cpu with --cpu)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--s3", action="store_true", help="also resume from a moto S3 server on 127.0.0.1")
    p.add_argument("--no-local", action="store_true", help="S3 only")
    p.add_argument("--verify", action="store_true", default=True)
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the checksum verification phase")
    p.add_argument("--drop-caches", action="store_true",
                   help="drop the machine's whole page cache (echo 3 > /proc/sys/vm/drop_caches; root) instead of "
                        "evicting the checkpoint's files with posix_fadvise")
    p.add_argument("--dir", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child-timeout", type=float, default=600)
    # child
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt-path", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--storage-options", help=argparse.SUPPRESS)
    p.add_argument("--t-spawn", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return {}

    import torch

    import bench_training as bt

    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: pass --cpu")
    preset = dict(bt.PRESETS[args.preset or ("cpu" if args.cpu else "1b")])
    if args.layers:
        preset["num_hidden_layers"] = args.layers
    args.batch = args.batch or preset["batch"]
    if args.cpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    work = tempfile.mkdtemp(prefix="skyrl-bench-resume-", dir=args.dir)
    env = {"device": torch.cuda.get_device_name(0) if not args.cpu else f"cpu x{os.cpu_count()}",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "preset": preset}
    result: dict = {"env": env, "local": None, "s3": None}
    lines = ["| where | start s | build s | find s | verify s | read+load s | first step s | total s | raw s | "
             "x raw (read+load) | x raw (find..load) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    server = None
    try:
        if not args.no_local:
            ckpt = os.path.join(work, "ckpt")
            nbytes, check = save_checkpoint(args, preset, ckpt, None)
            step_dir = os.path.join(ckpt, "global_step_2")
            paths = files_under(step_dir)
            size = sum(os.path.getsize(p) for p in paths)
            print(f"[bench_resume] local: {size / GIB:.2f} GiB in {len(paths)} files under {step_dir}", flush=True)
            rows, raws, how = [], [], None
            for i in range(args.runs):
                how = drop_caches(paths, args.drop_caches)
                raws.append(raw_read(paths))
                drop_caches(paths, args.drop_caches)
                r = run_child(args, preset, ckpt, None, work)
                if json.dumps(r["check"]) != check:
                    raise RuntimeError(f"resumed weights differ from the saved ones: {r['check']} != {check}")
                rows.append(r)
                print(f"[bench_resume] local run {i + 1}: total {r['total_s']:.2f} s (start {r['start_s']:.2f}, build "
                      f"{r['build_s']:.2f}, find {r['find_s']:.3f}, verify {r['verify_s']:.2f}, read+load {r['load_s']:.2f}, "
                      f"first step {r['first_step_s']:.2f}); cold raw read {raws[-1]:.2f} s ({how})", flush=True)
            lines.append(row_md(f"local ({how})", rows, raws, "read"))
            result["local"] = {"bytes": size, "files": len(paths), "rows": rows, "raw_read_s": raws, "cache_drop": how}
        if args.s3:
            from tests.servers import S3_TEST_CREDENTIALS, MotoS3Server

            os.environ.update(S3_TEST_CREDENTIALS)
            server = MotoS3Server().start()
            bucket = server.make_bucket("resume")
            so = server.storage_options
            ckpt = f"s3://{bucket}/run"
            nbytes, check = save_checkpoint(args, preset, ckpt, so)
            step_dir = f"{ckpt}/global_step_2"
            rows, raws = [], []
            for i in range(args.runs):
                raws.append(s3_raw_get(so, step_dir, os.path.join(work, "raw_get")))
                r = run_child(args, preset, ckpt, so, work)
                if json.dumps(r["check"]) != check:
                    raise RuntimeError(f"resumed weights differ from the saved ones: {r['check']} != {check}")
                rows.append(r)
                dl = r["downloads"]
                print(f"[bench_resume] s3 run {i + 1}: total {r['total_s']:.2f} s (find {r['find_s']:.3f}, verify "
                      f"{r['verify_s']:.2f}, read+load {r['load_s']:.2f}); raw s3fs get {raws[-1]:.2f} s; "
                      f"{len(dl)} object GETs of {len({d['object'] for d in dl})} objects, at most "
                      f"{concurrency(dl)} in flight", flush=True)
            lines.append(row_md("S3 (moto, 127.0.0.1)", rows, raws, "s3fs get"))
            dl = rows[-1]["downloads"]
            result["s3"] = {"bytes": nbytes, "rows": rows, "raw_get_s": raws,
                            "download_calls": len(dl), "objects": sorted({d["object"].split("/", 1)[-1] for d in dl}),
                            "max_in_flight": concurrency(dl)}
        md = "\n".join(lines)
        print("\n" + md, flush=True)
        if result["s3"]:
            s = result["s3"]
            print(f"\nS3 resume: {s['download_calls']} object GETs, objects {s['objects']}, at most "
                  f"{s['max_in_flight']} in flight at once", flush=True)
        result["markdown"] = md
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1, default=str)
        return result
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
