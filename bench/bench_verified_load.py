"""Benchmark: a verified resume (``verify_on_resume: true``, the default) against an unverified one.

One command (one process)::

    python bench/bench_verified_load.py --gib 1 --runs 5                 # CPU
    python bench/bench_verified_load.py --gib 4 --runs 3 --device cuda   # GPU destinations

The state: an MLP of fp32 ``Linear`` layers on ``--device`` and its AdamW state (model file +
optimizer file with two moments: the checkpoint is ~``--gib``), saved once by
``CheckpointManager`` (plain writer). Every round, each with a cold page cache (the files'
pages dropped with ``POSIX_FADV_DONTNEED``), in an order that alternates between rounds:

* ``raw read``: one stream of 8 MiB reads of the same files (the disk's reference);
* ``unverified``: ``CheckpointManager.load`` with ``verify_on_resume: false`` (sizes only);
* ``verified``: the same with ``verify_on_resume: true``: the model and optimizer files hashed as
  they are read for the load, the small files before it;
* ``hash, then load``: every file hashed first (``hash_file``, 4 threads: what Megatron's files
  get, and what ``verify_on_resume: true`` did before), then the unverified load;
* ``previous default``: the previous release's default resume: unverified, and the model file
  mmap'd rather than read straight into the parameters (on the CPU).

With ``--warm``, both loads are also timed with the files in the page cache (``(warm)`` rows,
ratio against the warm unverified load). Ratios (``x unverified`` = unverified time / this time,
so >= 0.95 is the goal) are taken within a round; the table shows medians. The loaded weights and moments are compared with the saved ones
after the last verified load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.bench_save import drop_cache, raw_read  # noqa: E402


def main() -> int:
    import torch

    from skyrl_callbacks import CheckpointManager
    from skyrl_callbacks.manifest import checksum_algo, read_manifest
    from skyrl_callbacks.roles import Role
    from skyrl_callbacks.verify import LoadVerification

    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0, help="checkpoint size (model + 2 Adam moments)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--warm", action="store_true", help="also time both loads with the files in the page cache")
    args = ap.parse_args()
    dev = torch.device(args.device)
    hidden = 2048
    layers = max(1, round(args.gib * 2**30 / 3 / (hidden * hidden * 4)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden, bias=False) for _ in range(layers)]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    saved_w = [p.detach().cpu().clone() for p in model.parameters()]
    saved_m = [opt.state[p]["exp_avg_sq"].cpu().clone() for p in model.parameters()]
    work = os.path.join(args.dir, f"skyrl-bench-verified-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    role = Role("policy", model, [opt], [])
    base = dict(ckpt_path=work, run_lock=False)
    CheckpointManager(base).save(1, [role])
    off = CheckpointManager(dict(base, verify_on_resume=False))
    on = CheckpointManager(dict(base, verify_on_resume=True))
    step_dir = off.step_dir(1)
    manifest = read_manifest(off.storage, step_dir)
    nbytes = sum(f["size"] for f in manifest["files"].values())
    big = [os.path.join(step_dir, "policy", n) for n in ("model_state.pt", "optimizer_state.pt")]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def unverified(cold: bool = True) -> float:
        if cold:
            drop_cache(step_dir)
        t0 = time.perf_counter()
        off.load([role], step_dir)
        sync()
        return time.perf_counter() - t0

    def verified(cold: bool = True) -> float:
        if cold:
            drop_cache(step_dir)
        t0 = time.perf_counter()
        on.load([role], step_dir)
        sync()
        return time.perf_counter() - t0

    def hash_then_load() -> float:
        drop_cache(step_dir)
        t0 = time.perf_counter()
        v = LoadVerification(off.storage, step_dir, manifest["files"], manifest.get("checksum_algo", checksum_algo()))
        on._hash_shared(v, v.tracked, step_dir)
        off.load([role], step_dir)
        sync()
        return time.perf_counter() - t0

    def previous_default() -> float:
        """The previous release's default resume: unverified, the model file mmap'd (page faults,
        then load_state_dict's copy) instead of read straight into the parameters."""
        import contextlib

        from skyrl_callbacks.writers import plain

        real = plain.open_skeleton

        @contextlib.contextmanager
        def no_model_skeleton(storage, path, **kw):
            if path.endswith("model_state.pt"):
                yield None
                return
            with real(storage, path, **kw) as skel:
                yield skel

        plain.open_skeleton = no_model_skeleton
        try:
            return unverified()
        finally:
            plain.open_skeleton = real

    def raw() -> float:
        return sum(raw_read(p) for p in big)

    methods = {"raw read": raw, "unverified": unverified, "verified": verified, "hash, then load": hash_then_load,
               "previous default (unverified, model mmap'd)": previous_default}
    if args.warm:  # the page cache holds the files: what the hash costs where reading is only a copy
        methods["unverified (warm)"] = lambda: unverified(cold=False)
        methods["verified (warm)"] = lambda: verified(cold=False)
    names = list(methods)
    unverified()  # warm-up (imports, allocator)
    rounds = []
    for r in range(args.runs):
        order = names if r % 2 == 0 else names[::-1]
        rounds.append({n: methods[n]() for n in order})
        print(f"round {r + 1}: " + ", ".join(f"{n} {rounds[-1][n]:.3f} s" for n in names), flush=True)
    verified()
    ok = all(torch.equal(p.detach().cpu(), w) for p, w in zip(model.parameters(), saved_w)) and all(
        torch.equal(opt.state[p]["exp_avg_sq"].cpu(), m) for p, m in zip(model.parameters(), saved_m))
    med = statistics.median
    print()
    print(f"device {args.device}, checkpoint {nbytes / 2**30:.2f} GiB ({layers} layers of {hidden}x{hidden} fp32 + "
          f"AdamW), {args.runs} rounds, cold page cache, checksum {manifest.get('checksum_algo')}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; loaded state equal to the saved one: {ok}")
    print()
    print("| method | median s | GB/s | x unverified (same round) |")
    print("| --- | ---: | ---: | ---: |")
    for n in names:
        t = med([x[n] for x in rounds])
        ref = "unverified (warm)" if n.endswith("(warm)") else "unverified"
        ratio = med([x[ref] / x[n] for x in rounds])
        print(f"| {n} | {t:.3f} | {nbytes / 1e9 / t:.2f} | {ratio:.3f} |")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
