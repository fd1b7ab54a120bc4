"""A store that never answers, or refuses connections, fails a save/resume within the retry deadline.

Local sockets stand in for the broken store: one that accepts TCP connections and never answers
(a hung endpoint), and a closed port (refused). The checkpoint manager runs with
``cloud_retry_deadline_s=3``; every save/resume/lock acquisition must raise our StorageError naming
the endpoint within the deadline plus the margin documented in docs/cloud.md, on every rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from skyrl_callbacks import CheckpointConfig, CheckpointManager, StorageError
from skyrl_callbacks.cloud import GCSFS_ATTEMPTS, S3FS_ATTEMPTS, network_timeouts
from skyrl_callbacks.roles import discover_roles
from skyrl_callbacks.storage import Storage
from tests.servers import S3_TEST_CREDENTIALS

DEADLINE = 3.0
# docs/cloud.md: one attempt against a silent store lasts at most S3FS_ATTEMPTS (GCS: GCSFS_ATTEMPTS) network
# timeouts plus the client's sleeps between them (s3fs 0.6 s, gcsfs 2 s); an operation gives up at most that long
# after its deadline.
MARGIN = {"s3": S3FS_ATTEMPTS * max(network_timeouts(DEADLINE)) + 0.6,
          "gs": GCSFS_ATTEMPTS * max(network_timeouts(DEADLINE)) + 2.0}
SLACK = 3.0  # a loaded 2-core CI machine (imports, thread start-up)


class HungEndpoint:
    """Accepts TCP connections and never answers (nor closes them)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        for c in self.conns + [self.sock]:
            c.close()


@pytest.fixture
def hung():
    ep = HungEndpoint()
    yield ep.url
    ep.close()


@pytest.fixture
def refused():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch):
    for k, v in S3_TEST_CREDENTIALS.items():
        monkeypatch.setenv(k, v)


def roles():
    m = torch.nn.Module()
    m.policy = torch.nn.Linear(2, 2)
    return discover_roles(m)


def manager(url: str, store: str = "s3") -> CheckpointManager:
    opts = {"endpoint_url": url} if store == "s3" else {"endpoint_url": url, "token": "anon", "project": "test"}
    return CheckpointManager(CheckpointConfig(
        ckpt_path=f"{store}://bucket/run", storage_options=opts, cloud_retry_deadline_s=DEADLINE))


def timed(fn, limit: float = 60.0) -> tuple[BaseException, float]:
    """Run ``fn`` in a thread (the code before the fix never returned) -> (its error, seconds)."""
    box: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            box["exc"] = exc
        box["dt"] = time.monotonic() - t0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(limit)
    assert not th.is_alive(), f"still waiting on the store after {limit:.0f} s"
    assert "exc" in box, "no error raised"
    return box["exc"], box["dt"]


def check(exc: BaseException, dt: float, url: str, store: str = "s3") -> None:
    assert isinstance(exc, StorageError), repr(exc)
    assert url in str(exc), str(exc)
    bound = DEADLINE + MARGIN[store] + SLACK
    assert dt < bound, f"{dt:.1f} s > deadline {DEADLINE} + margin {MARGIN[store]:.1f} + {SLACK}"


@pytest.mark.parametrize("kind", ["hung", "refused"])
@pytest.mark.parametrize("op", ["save", "resume"])
def test_dead_endpoint_fails_save_and_resume_within_deadline(request, kind, op):
    url = request.getfixturevalue(kind)
    mgr = manager(url)
    exc, dt = timed(lambda: mgr.save(1, roles()) if op == "save" else mgr.resume(roles()))
    check(exc, dt, url)
    if kind == "refused":
        assert "attempts" in str(exc)  # retried until the deadline, not given up at once
        assert dt >= DEADLINE - 1.5


@pytest.mark.parametrize("kind", ["hung", "refused"])
def test_dead_gcs_endpoint_fails_save_within_deadline(request, kind):
    pytest.importorskip("gcsfs")
    url = request.getfixturevalue(kind)
    mgr = manager(url, "gs")
    exc, dt = timed(lambda: mgr.save(1, roles()))
    check(exc, dt, url, "gs")


def test_hung_endpoint_at_lock_acquisition(hung):
    mgr = manager(hung)
    exc, dt = timed(mgr.acquire_lock)
    check(exc, dt, hung)
    assert ".skyrl_lock.json" in str(exc)


def test_storage_options_override_the_network_defaults():
    st = Storage("s3://bucket/run", {"endpoint_url": "http://127.0.0.1:1", "config_kwargs": {"read_timeout": 77}},
                 retry_deadline_s=DEADLINE)
    connect, read = network_timeouts(DEADLINE)
    assert st.fs.config_kwargs["read_timeout"] == 77  # the user's value wins
    assert st.fs.config_kwargs["connect_timeout"] == connect
    assert st.fs.config_kwargs["retries"] == {"total_max_attempts": 1}
    assert st.fs.retries == S3FS_ATTEMPTS
    assert network_timeouts(120) == (10.0, 20.0) and network_timeouts(3) == (1.0, 1.0)


WORKER = r"""
import json, os, sys, time
import torch, torch.distributed as tdist
from skyrl_callbacks import CheckpointConfig, CheckpointManager
from skyrl_callbacks.roles import discover_roles
rank, port, url, deadline = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
m = torch.nn.Module(); m.policy = torch.nn.Linear(2, 2)
mgr = CheckpointManager(CheckpointConfig(ckpt_path="s3://bucket/run", storage_options={"endpoint_url": url},
                                         cloud_retry_deadline_s=deadline))
out = {}
for op in ("save",):
    t0 = time.monotonic()
    try:
        mgr.save(1, discover_roles(m))
        out[op] = ["no error", "", time.monotonic() - t0]
    except Exception as exc:
        out[op] = [type(exc).__name__, str(exc), time.monotonic() - t0]
print("RESULT " + json.dumps(out), flush=True)
os._exit(0)
"""


def test_hung_endpoint_fails_on_every_rank(hung):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    p = str(port.getsockname()[1])
    port.close()
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), p, hung, str(DEADLINE)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=180)
            lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
            assert lines, out[-3000:]
            results.append(json.loads(lines[0][7:]))
    finally:
        for proc in procs:
            proc.kill()
    for rank, res in enumerate(results):
        for op in ("save",):
            name, msg, dt = res[op]
            # the rank that hit the store raises StorageError; a rank that waited for it in the
            # collective raises RankFailure quoting it
            assert name == "StorageError" or (name == "RankFailure" and "StorageError" in msg), (rank, op, name, msg)
            assert hung in msg, (rank, op, msg)
            assert dt < DEADLINE + MARGIN["s3"] + SLACK, (rank, op, dt)
