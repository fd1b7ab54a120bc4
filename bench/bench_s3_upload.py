"""Benchmark: the checkpoint manager's S3 upload path vs plain ``s3fs.put(recursive=True)``.

Starts its own moto S3 server on 127.0.0.1, builds a checkpoint-like directory (a few
large shards plus small files), then uploads it alternately with

* ``raw``:  ``s3fs.S3FileSystem.put(local_dir, remote, recursive=True)``
* ``ours``: ``Storage(s3://...).upload_files(local_dir, remote, files)`` -- exactly the call
  :class:`~skyrl_callbacks.CheckpointManager` makes in the upload phase of a staged save
  (concurrent files, multipart parts, per-file retries; ``skyrl_callbacks.cloud.upload_files``)

for ``--rounds`` rounds (the order alternates each round), verifies every upload, and
prints the median time, MB/s and the ratio ours/raw (throughput; > 1 means faster).

Then (unless ``--no-manager``) it times whole ``CheckpointManager.save`` calls of a model
whose weights + AdamW state are about the tree's size, with ``cloud_upload="staged"`` and
``"stream"`` (write, checksum, upload, manifest, pointer), alternating the same way.

Run from the repository root::

    python bench/bench_s3_upload.py                 # 8 x 32 MiB + 16 small files, 3 rounds
    python bench/bench_s3_upload.py --files 4 --file-mib 64 --rounds 5

Note: moto is a single Python process; on a small machine it, not the client, is the
bottleneck, so the ratio measures overhead more than peak throughput.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.servers import S3_TEST_CREDENTIALS, MotoS3Server  # noqa: E402

MiB = 1 << 20


def build_tree(root: str, files: int, file_mib: int, small: int, small_kib: int) -> int:
    """Write the checkpoint-like tree; return its total size in bytes."""
    total = 0
    block = os.urandom(MiB)
    for i in range(files):
        path = os.path.join(root, "model", f"shard-{i:05d}.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            for j in range(file_mib):
                # vary each MiB a little so no two blocks are equal
                fh.write(block[j % 97 :] + block[: j % 97])
        total += file_mib * MiB
    for i in range(small):
        path = os.path.join(root, "meta" if i % 2 else "optim", f"part-{i:03d}.bin")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = os.urandom(small_kib * 1024)
        with open(path, "wb") as fh:
            fh.write(data)
        total += len(data)
    return total


def expected_sizes(root: str) -> dict[str, int]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            full = os.path.join(dirpath, n)
            out[os.path.relpath(full, root).replace(os.sep, "/")] = os.path.getsize(full)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=8, help="number of large files")
    ap.add_argument("--file-mib", type=int, default=32, help="size of each large file, MiB")
    ap.add_argument("--small", type=int, default=16, help="number of small files")
    ap.add_argument("--small-kib", type=int, default=64, help="size of each small file, KiB")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (each uploads both ways)")
    ap.add_argument("--concurrency", type=int, default=8, help="upload_dir max_concurrency")
    ap.add_argument("--workdir", default=None, help="where to build the tree (default: tmp)")
    ap.add_argument("--no-manager", action="store_true", help="skip the CheckpointManager.save rounds")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    for k, v in S3_TEST_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    import fsspec

    from skyrl_callbacks.storage import Storage

    work = tempfile.mkdtemp(prefix="bench-s3-", dir=args.workdir)
    server = MotoS3Server()
    try:
        local = os.path.join(work, "global_step_100")
        total = build_tree(local, args.files, args.file_mib, args.small, args.small_kib)
        want = expected_sizes(local)
        server.start()
        bucket = server.make_bucket("bench")
        fs = fsspec.filesystem("s3", **server.storage_options)
        print(
            f"tree: {len(want)} files, {total / MiB:.1f} MiB; moto at {server.endpoint_url}; "
            f"{args.rounds} rounds, order alternating",
            flush=True,
        )

        def raw(prefix: str) -> None:
            fs.put(local, prefix, recursive=True)

        storage = Storage(f"s3://{bucket}", server.storage_options, upload_concurrency=args.concurrency)
        rels = sorted(want)

        def ours(prefix: str) -> None:
            storage.upload_files(local, f"s3://{prefix}", rels)

        methods = {"raw s3fs.put": raw, "ours upload_files": ours}
        times: dict[str, list[float]] = {m: [] for m in methods}
        cpu: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(args.rounds):
            order = list(methods) if r % 2 == 0 else list(methods)[::-1]
            for name in order:
                prefix = f"{bucket}/r{r}-{name.split()[0]}"
                t0, c0 = time.perf_counter(), time.process_time()
                methods[name](prefix)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                fs.invalidate_cache()
                got = {
                    p[len(prefix) + 1 :]: info["size"]
                    for p, info in fs.find(prefix, detail=True).items()
                }
                if got != want:
                    raise SystemExit(f"{name}: uploaded tree differs from the local one")
                fs.rm(prefix, recursive=True)  # keep moto's memory flat
                times[name].append(dt)
                cpu[name].append(dc)
                print(f"  round {r + 1} {name:<16} {dt:7.3f}s  {total / MiB / dt:8.1f} MiB/s  client CPU {dc:6.3f}s",
                      flush=True)

        med = {m: statistics.median(v) for m, v in times.items()}
        raw_tp = total / MiB / med["raw s3fs.put"]
        print()
        print(f"{'method':<18}{'median s':>10}{'min s':>9}{'max s':>9}{'MiB/s':>9}{'ours/raw':>10}{'client CPU s':>14}")
        for m, v in times.items():
            tp = total / MiB / med[m]
            print(
                f"{m:<18}{med[m]:>10.3f}{min(v):>9.3f}{max(v):>9.3f}{tp:>9.1f}{tp / raw_tp:>9.2f}x"
                f"{statistics.median(cpu[m]):>14.3f}"
            )
        ratio = med["raw s3fs.put"] / med["ours upload_files"]
        print(f"\nthroughput ratio ours/raw (median): {ratio:.2f}x (goal >= 0.90x)")
        if not args.no_manager:
            bench_manager(server, bucket, total, args.rounds, work)
        return 0
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def bench_manager(server, bucket: str, total: int, rounds: int, work: str) -> None:
    """Whole ``CheckpointManager.save`` calls, staged vs stream, of a model of ~``total`` bytes."""
    import torch
    from torch import nn

    from skyrl_callbacks import CheckpointManager
    from skyrl_callbacks.roles import Role

    torch.manual_seed(0)
    # weights + AdamW's two moments = 3 x weights ~ total; 4 layers -> 4 tensors per file
    width = max(256, int((total / 3 / 4 / 4) ** 0.5))
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    roles = [Role("policy", model, [opt])]
    times: dict[str, list[float]] = {"staged": [], "stream": []}
    cpu: dict[str, list[float]] = {"staged": [], "stream": []}
    managers = {
        mode: CheckpointManager(dict(
            ckpt_path=f"s3://{bucket}/mgr-{mode}", storage_options=server.storage_options, cloud_upload=mode,
            max_ckpts_to_keep=1, cloud_staging_dir=os.path.join(work, "stage"),
        ))
        for mode in times
    }
    for mgr in managers.values():  # warm-up (imports, connections), not timed
        mgr.save(0, [Role("policy", nn.Linear(4, 4))])
    nbytes = 0
    for r in range(rounds):
        order = ["staged", "stream"] if r % 2 == 0 else ["stream", "staged"]
        for mode in order:
            t0, c0 = time.perf_counter(), time.process_time()
            res = managers[mode].save(r + 1, roles)
            dt = time.perf_counter() - t0
            cpu[mode].append(time.process_time() - c0)
            nbytes = res.bytes
            times[mode].append(dt)
            print(f"  round {r + 1} save {mode:<7} {dt:7.3f}s  {res.bytes / MiB / dt:8.1f} MiB/s", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\nCheckpointManager.save of {nbytes / MiB:.1f} MiB (policy weights + AdamW state), {rounds} rounds")
    print(f"{'mode':<18}{'median s':>10}{'min s':>9}{'max s':>9}{'MiB/s':>9}{'client CPU s':>14}")
    for m, v in times.items():
        print(f"{m:<18}{med[m]:>10.3f}{min(v):>9.3f}{max(v):>9.3f}{nbytes / MiB / med[m]:>9.1f}"
              f"{statistics.median(cpu[m]):>14.3f}")


if __name__ == "__main__":
    sys.exit(main())
