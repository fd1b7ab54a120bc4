"""Benchmark: the manifest checksum against the disk speed (docs/reliability.md, "Checksum cost").

For each size (default 256 MiB and 1 GiB of random bytes) it measures, ``--runs`` times each,
interleaved, and reports medians:

* ``raw write``: the bytes written to a file in ``--dir`` in 8 MiB chunks, ``fsync``, close
  (what the disk costs; the reference every ratio is relative to);
* one pass of each checksum over the bytes in memory, 8 MiB chunks (the manifest's chunking):
  ``xxh3_64`` (xxhash; what the manifest uses), ``crc32`` (zlib; its fallback), ``crc32c``
  (google_crc32c or crc32c, when importable), ``sha256`` (hashlib);
* ``hash_file(xxh3)``: :func:`skyrl_callbacks.manifest.hash_file` on the written file (what a
  local save actually does: it reads the file back, from the page cache, and hashes it);
* ``save``: a whole ``CheckpointManager.save`` of a model whose weights are that size (write,
  fsync, manifest, rename, pointer), with checksums and with the checksum step replaced by a
  size-only stub (both the read-back ``hash_file`` and the write-time hasher switched off);
  ``checksum share`` = (with - without) / with.

Run from the repository root::

    python bench/bench_checksum.py                       # 256 MiB and 1 GiB, 5 runs
    python bench/bench_checksum.py --sizes-mib 64 --runs 3 --dir /mnt/nvme/tmp
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CHUNK = 8 << 20


def _crc32c_fn():
    try:
        import google_crc32c

        def run(buf: memoryview) -> str:
            # its C extension takes bytes only (no memoryview slices): one call over the whole
            # buffer, so no copy is timed
            return f"{google_crc32c.value(buf.obj):08x}"

        return f"crc32c (google_crc32c, {google_crc32c.implementation})", run
    except ImportError:
        pass
    try:
        import crc32c

        def run(buf: memoryview) -> str:
            v = 0
            for i in range(0, len(buf), CHUNK):
                v = crc32c.crc32c(buf[i:i + CHUNK], v)
            return f"{v:08x}"

        return "crc32c (crc32c)", run
    except ImportError:
        return None, None


def _xxh3(buf: memoryview) -> str:
    import xxhash

    h = xxhash.xxh3_64()
    for i in range(0, len(buf), CHUNK):
        h.update(buf[i:i + CHUNK])
    return h.hexdigest()


def _crc32(buf: memoryview) -> str:
    v = 0
    for i in range(0, len(buf), CHUNK):
        v = zlib.crc32(buf[i:i + CHUNK], v)
    return f"{v:08x}"


def _sha256(buf: memoryview) -> str:
    h = hashlib.sha256()
    for i in range(0, len(buf), CHUNK):
        h.update(buf[i:i + CHUNK])
    return h.hexdigest()


def _raw_write(path: str, buf: memoryview) -> None:
    with open(path, "wb") as fh:
        for i in range(0, len(buf), CHUNK):
            fh.write(buf[i:i + CHUNK])
        fh.flush()
        os.fsync(fh.fileno())
    os.unlink(path)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _saves(size: int, runs: int, base: str) -> tuple[list[float], list[float]]:
    """Wall time of CheckpointManager.save with and without checksums (alternating)."""
    import torch

    import skyrl_callbacks.manifest as manifest_mod
    from skyrl_callbacks import CheckpointConfig, CheckpointManager
    from skyrl_callbacks.roles import Role

    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.rand(size // 4))
    real_hash = manifest_mod.hash_file

    def size_only(storage, path, algo=None):  # the same bookkeeping, no bytes hashed
        return os.path.getsize(path), None

    class _NoHash:  # local files are hashed as they are written (storage._LocalRaw): switch that off too
        def update(self, data) -> None:
            pass

        def hexdigest(self) -> str:
            return ""

    real_hasher = manifest_mod._hasher

    with_cs, without_cs = [], []
    ckpt = os.path.join(base, "ckpts")
    mgr = CheckpointManager(CheckpointConfig(ckpt_path=ckpt, export_path=os.path.join(base, "exp"),
                                             max_ckpts_to_keep=1, run_lock=False, ckpt_interval=1))
    step = 0
    for i in range(runs * 2):
        checksums = (i % 2 == 0) if (i // 2) % 2 == 0 else (i % 2 == 1)  # alternate which goes first
        manifest_mod.hash_file = real_hash if checksums else size_only
        manifest_mod._hasher = real_hasher if checksums else (lambda algo: _NoHash())
        step += 1
        try:
            t = _timed(lambda: mgr.save(step, [Role(name="policy", model=model)]))
        finally:
            manifest_mod.hash_file = real_hash
            manifest_mod._hasher = real_hasher
        (with_cs if checksums else without_cs).append(t)
    mgr.close()
    shutil.rmtree(ckpt, ignore_errors=True)
    return with_cs, without_cs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mib", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir under the system temp dir)")
    p.add_argument("--no-save", action="store_true", help="skip the CheckpointManager.save measurement")
    args = p.parse_args()

    from skyrl_callbacks.manifest import hash_file
    from skyrl_callbacks.storage import Storage

    base = tempfile.mkdtemp(prefix="skyrl-bench-cs-", dir=args.dir)
    crc32c_name, crc32c_fn = _crc32c_fn()
    algos = [("xxh3_64 (xxhash)", _xxh3), ("crc32 (zlib)", _crc32)]
    if crc32c_fn is not None:
        algos.append((crc32c_name, crc32c_fn))
    algos.append(("sha256 (hashlib)", _sha256))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}; "
          f"python {platform.python_version()}; dir {base}")
    try:
        for mib in args.sizes_mib:
            size = mib << 20
            buf = memoryview(os.urandom(size))
            times: dict[str, list[float]] = {"raw write (fsync)": []}
            for name, _fn in algos:
                times[name] = []
            times["hash_file(xxh3) of the written file"] = []
            path = os.path.join(base, "blob")
            for _ in range(args.runs):
                times["raw write (fsync)"].append(_timed(lambda: _raw_write(path, buf)))
                for name, fn in algos:
                    times[name].append(_timed(lambda: fn(buf)))
                with open(path, "wb") as fh:
                    fh.write(buf)
                    os.fsync(fh.fileno())
                st = Storage(base)
                times["hash_file(xxh3) of the written file"].append(_timed(lambda: hash_file(st, path, "xxh3_64")))
                os.unlink(path)
            raw = statistics.median(times["raw write (fsync)"])
            print(f"\n{mib} MiB, median of {args.runs} runs")
            print(f"| {'what':<40} | {'median s':>9} | {'GB/s':>7} | {'vs raw write':>12} |")
            print(f"| {'-' * 40} | {'-' * 8}: | {'-' * 6}: | {'-' * 11}: |")
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"| {name:<40} | {med:9.3f} | {size / 1e9 / med:7.2f} | {100 * med / raw:11.1f}% |")
            if not args.no_save:
                with_cs, without_cs = _saves(size, args.runs, base)
                a, b = statistics.median(with_cs), statistics.median(without_cs)
                print(f"| {'CheckpointManager.save, xxh3 manifest':<40} | {a:9.3f} | {size / 1e9 / a:7.2f} | "
                      f"{100 * a / raw:11.1f}% |")
                print(f"| {'CheckpointManager.save, sizes only':<40} | {b:9.3f} | {size / 1e9 / b:7.2f} | "
                      f"{100 * b / raw:11.1f}% |")
                print(f"checksum share of the save: {100 * (a - b) / a:.1f}% "
                      f"(with {', '.join(f'{t:.2f}' for t in with_cs)}; without {', '.join(f'{t:.2f}' for t in without_cs)})")
            del buf
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
