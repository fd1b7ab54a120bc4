"""Real object-store servers for tests and benchmarks, all on 127.0.0.1.

* :class:`MotoS3Server` -- ``moto`` S3 server in a child process (``python -m moto.server``).
* :class:`GcsEmulator` -- ``gcp-storage-emulator`` in a child process, in memory.
* :class:`FaultProxy` -- a small threaded HTTP/1.1-aware TCP proxy that injects connection
  resets and ``503 Slow Down`` answers on a schedule, with counters.

Nothing here imports s3fs/gcsfs: buckets are created with plain HTTP (GCS JSON API) or
botocore, so the servers can be used to test the code that does import them.

Child processes are started with ``PR_SET_PDEATHSIG`` (Linux) so they die with the process
that started them, and are also stopped by an ``atexit`` hook; :meth:`stop` is idempotent.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from typing import Optional

__all__ = [
    "free_port",
    "wait_for_port",
    "ServerStartError",
    "MotoS3Server",
    "GcsEmulator",
    "FaultProxy",
    "S3_TEST_CREDENTIALS",
]

HOST = "127.0.0.1"
S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

_LIVE: "set[_ChildServer]" = set()
_LIVE_LOCK = threading.Lock()


class ServerStartError(RuntimeError):
    """A test server did not come up; the message carries the tail of its log."""


def free_port(host: str = HOST) -> int:
    """A TCP port that is free right now on ``host`` (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 30.0,
    proc: Optional[subprocess.Popen] = None,
    log_path: Optional[str] = None,
    name: str = "server",
) -> None:
    """Block until ``host:port`` accepts a TCP connection.

    Raises:
        ServerStartError: the process exited, or the port did not open within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServerStartError(
                f"{name} exited with code {proc.returncode} before listening on {host}:{port}."
                f"\n--- log ---\n{_tail(log_path)}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"{name} did not accept connections on {host}:{port} within {timeout:.0f}s."
                f"\n--- log ---\n{_tail(log_path)}"
            )
        time.sleep(0.05)


def _tail(path: Optional[str], n: int = 4000) -> str:
    if not path:
        return "(no log)"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - n))
            return fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read log {path}: {exc})"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """preexec_fn: ask Linux to SIGTERM the child when the parent thread dies."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class _ChildServer:
    """A server in a child process on a free port, with its log in a temp file."""

    name = "server"
    start_timeout = 60.0

    def __init__(self, host: str = HOST, port: Optional[int] = None) -> None:
        self.host = host
        self._fixed_port = port
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self.log_path: Optional[str] = None
        self._log_fh = None

    # -- to override -----------------------------------------------------------------
    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    def _ready_check(self) -> None:
        """Extra check after the port accepts; raise to signal 'not ready yet'."""

    # -- lifecycle --------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} is not started")
        return f"http://{self.host}:{self.port}"

    def start(self, attempts: int = 3) -> "_ChildServer":
        """Start the child and wait until it serves; retried on a lost port race."""
        last: Optional[Exception] = None
        for _ in range(attempts):
            port = self._fixed_port or free_port(self.host)
            try:
                self._spawn(port)
                wait_for_port(
                    self.host,
                    port,
                    timeout=self.start_timeout,
                    proc=self.proc,
                    log_path=self.log_path,
                    name=self.name,
                )
                self._wait_ready()
                return self
            except ServerStartError as exc:
                last = exc
                self.stop()
                if self._fixed_port:
                    break
        raise ServerStartError(f"could not start {self.name}: {last}")

    def _spawn(self, port: int) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
        self._log_fh = os.fdopen(fd, "wb")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            self._command(port),
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.port = port
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._ready_check()
                return
            except Exception as exc:
                if self.proc is not None and self.proc.poll() is not None:
                    raise ServerStartError(
                        f"{self.name} exited with code {self.proc.returncode}.\n"
                        f"--- log ---\n{_tail(self.log_path)}"
                    ) from exc
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"{self.name} on port {self.port} accepted connections but did not "
                        f"answer within {timeout:.0f}s: {exc!r}\n--- log ---\n{_tail(self.log_path)}"
                    ) from exc
                time.sleep(0.1)

    def stop(self) -> None:
        """Terminate the child (SIGTERM, then SIGKILL after 5 s); idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log_fh is not None:
            with contextlib.suppress(OSError):
                self._log_fh.close()
            self._log_fh = None
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)
            self.log_path = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def log(self) -> str:
        """The tail of the server's log (for debugging a failing test)."""
        return _tail(self.log_path)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:  # pragma: no cover - safety net
    with _LIVE_LOCK:
        live = list(_LIVE)
    for server in live:
        with contextlib.suppress(Exception):
            server.stop()


def _http(method: str, url: str, body: Optional[dict] = None, timeout: float = 10.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()


def _bucket_name(prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:12]}".lower()
    return name[:63]


class MotoS3Server(_ChildServer):
    """``moto`` S3 server in a child process.

    Attributes:
        endpoint_url: ``http://127.0.0.1:PORT``.
        storage_options: keyword arguments for ``fsspec.filesystem("s3", **opts)``.
    """

    name = "moto_server"

    def _command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(port)]

    def _ready_check(self) -> None:
        # The moto management API answers once the WSGI app is up.
        _http("GET", f"{self.endpoint_url}/moto-api/data.json", timeout=5)

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint_url, "key": "testing", "secret": "testing"}

    def client(self, endpoint_url: Optional[str] = None):
        """A botocore S3 client on this server (independent of s3fs)."""
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            region_name="us-east-1",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        name = _bucket_name(prefix)
        self.client().create_bucket(Bucket=name)
        return name

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset API)."""
        _http("POST", f"{self.endpoint_url}/moto-api/reset")


class GcsEmulator(_ChildServer):
    """``gcp-storage-emulator`` in a child process, in-memory storage.

    Attributes:
        endpoint_url: ``http://127.0.0.1:PORT``.
        storage_options: keyword arguments for ``fsspec.filesystem("gcs", **opts)``.

    Note:
        gcsfs must be imported with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` in the
        environment, else each bucket access first tries a gRPC call that times out (60 s).
    """

    name = "gcp-storage-emulator"
    project = "test"

    def _command(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host",
            self.host,
            "--port",
            str(port),
            "--in-memory",
            "--quiet",
        ]

    def _ready_check(self) -> None:
        _http("GET", f"{self.endpoint_url}/storage/v1/b?project={self.project}", timeout=5)

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint_url, "token": "anon", "project": self.project}

    def make_bucket(self, prefix: str = "test") -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        name = _bucket_name(prefix)
        status, body = _http(
            "POST", f"{self.endpoint_url}/storage/v1/b?project={self.project}", {"name": name}
        )
        if status != 200:
            raise RuntimeError(f"creating GCS bucket {name} failed: HTTP {status} {body[:200]!r}")
        return name


# ----------------------------------------------------------------------------------------
# Fault-injecting proxy
# ----------------------------------------------------------------------------------------

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY</RequestId><HostId>fault-proxy</HostId></Error>"
)

_MAX_HEAD = 64 * 1024


class _Closed(Exception):
    """The peer closed the connection between requests."""


def _read_head(reader) -> Optional[bytes]:
    """Read an HTTP head (request or status line + headers). None on clean EOF."""
    lines = []
    total = 0
    while True:
        line = reader.readline(_MAX_HEAD + 1)
        if not line:
            if lines:
                raise _Closed("EOF inside an HTTP head")
            return None
        if not lines and line in (b"\r\n", b"\n"):
            continue  # tolerate stray CRLF between requests
        lines.append(line)
        total += len(line)
        if total > _MAX_HEAD:
            raise _Closed("HTTP head too large")
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _parse_headers(head: bytes) -> tuple[str, dict[str, str]]:
    text = head.decode("latin-1")
    first, *rest = text.split("\r\n")
    headers: dict[str, str] = {}
    for line in rest:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return first, headers


def _read_exact(reader, n: int) -> bytes:
    buf = reader.read(n)
    if len(buf) != n:
        raise _Closed(f"EOF after {len(buf)} of {n} body bytes")
    return buf


def _read_chunked(reader) -> bytes:
    """Read a chunked body, returning its raw framing (to forward unchanged)."""
    out = []
    while True:
        line = reader.readline(_MAX_HEAD)
        if not line:
            raise _Closed("EOF in chunked body")
        out.append(line)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers up to the blank line
                t = reader.readline(_MAX_HEAD)
                if not t:
                    raise _Closed("EOF in chunked trailers")
                out.append(t)
                if t in (b"\r\n", b"\n"):
                    return b"".join(out)
        out.append(_read_exact(reader, size + 2))


def _read_body(reader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _read_chunked(reader)
    n = int(headers.get("content-length", "0") or 0)
    return _read_exact(reader, n) if n else b""


def _strip_header(head: bytes, name: str) -> bytes:
    lines = head.split(b"\r\n")
    key = name.lower().encode() + b":"
    return b"\r\n".join(l for l in lines if not l.lower().startswith(key))


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST (ECONNRESET)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """Threaded HTTP/1.1 proxy to ``upstream`` that injects faults on a schedule.

    Requests are numbered 1, 2, 3... across all connections. Request ``k`` is faulted when
    ``k <= first_n`` or (``every_nth`` and ``k % every_nth == 0``). A fault is one of

    * ``"reset"``: the client connection is closed with a TCP RST as soon as the request
      head has arrived (nothing is forwarded);
    * ``"503"``: the body is read, then ``HTTP/1.1 503 Slow Down`` with an S3 ``SlowDown``
      XML error is answered and the connection closed (nothing is forwarded);
    * ``"mixed"``: alternately reset and 503.

    Counters (read any time): ``requests_seen``, ``requests_faulted``, ``resets``,
    ``slowdowns``, ``forwarded``. ``Expect: 100-continue`` is answered by the proxy.
    ``requests`` logs every forwarded request as ``(method, target, Range header or None)``;
    ``max_in_flight`` is the most forwarded requests waiting for their response at one moment.

    Args:
        upstream_host: upstream host.
        upstream_port: upstream port.
        mode: ``"reset"``, ``"503"`` or ``"mixed"``.
        first_n: fault the first N requests.
        every_nth: fault every Nth request (0: never).
        max_connections: at most this many client connections are served at once.
        io_timeout: socket timeout for client and upstream I/O.
    """

    MODES = ("reset", "503", "mixed")

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        mode: str = "reset",
        first_n: int = 0,
        every_nth: int = 0,
        host: str = HOST,
        max_connections: int = 64,
        io_timeout: float = 30.0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port: Optional[int] = None
        self.io_timeout = io_timeout
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._listener: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._threads: set[threading.Thread] = set()
        self._socks: set[socket.socket] = set()
        self.configure(mode=mode, first_n=first_n, every_nth=every_nth)

    # -- schedule and counters --------------------------------------------------------
    def configure(self, *, mode: str = "reset", first_n: int = 0, every_nth: int = 0) -> None:
        """Set a new fault schedule and zero the counters."""
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if first_n < 0 or every_nth < 0:
            raise ValueError("first_n and every_nth must be >= 0")
        with self._lock:
            self.mode = mode
            self.first_n = first_n
            self.every_nth = every_nth
            self.requests_seen = 0
            self.requests_faulted = 0
            self.resets = 0
            self.slowdowns = 0
            self.forwarded = 0
            self.requests: list[tuple[str, str, Optional[str]]] = []
            self.in_flight = 0
            self.max_in_flight = 0

    def fault_always(self, mode: str = "503") -> None:
        """Fault every request from now on (persistent outage)."""
        self.configure(mode=mode, every_nth=1)

    def heal(self) -> None:
        """Stop injecting faults (counters are kept)."""
        with self._lock:
            self.first_n = 0
            self.every_nth = 0

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "requests_seen": self.requests_seen,
                "requests_faulted": self.requests_faulted,
                "resets": self.resets,
                "slowdowns": self.slowdowns,
                "forwarded": self.forwarded,
            }

    def _decide(self) -> Optional[str]:
        with self._lock:
            self.requests_seen += 1
            k = self.requests_seen
            fault = (self.first_n and k <= self.first_n) or (
                self.every_nth and k % self.every_nth == 0
            )
            if not fault:
                self.forwarded += 1
                return None
            self.requests_faulted += 1
            kind = self.mode
            if kind == "mixed":
                kind = "reset" if self.requests_faulted % 2 else "503"
            if kind == "reset":
                self.resets += 1
            else:
                self.slowdowns += 1
            return kind

    # -- lifecycle --------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> "FaultProxy":
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((self.host, 0))
        lst.listen(128)
        lst.settimeout(0.2)
        self._listener = lst
        self.port = lst.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"fault-proxy-{self.port}", daemon=True
        )
        self._accept_thread.start()
        wait_for_port(self.host, self.port, timeout=10, name="FaultProxy")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, join the threads (bounded)."""
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        end = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                csock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            # Bounded: wait for a free slot (checking for stop).
            while not self._slots.acquire(timeout=0.2):
                if self._stop.is_set():
                    _reset(csock)
                    return
            t = threading.Thread(target=self._serve, args=(csock,), daemon=True)
            with self._lock:
                self._threads.add(t)
                self._socks.add(csock)
            t.start()

    def _serve(self, csock: socket.socket) -> None:
        upstream: Optional[socket.socket] = None
        try:
            csock.settimeout(self.io_timeout)
            creader = csock.makefile("rb")
            ureader = None
            while not self._stop.is_set():
                head = _read_head(creader)
                if head is None:
                    return
                request_line, headers = _parse_headers(head)
                method = request_line.split(" ", 1)[0].upper()
                fault = self._decide()
                if fault == "reset":
                    _reset(csock)
                    return
                if headers.get("expect", "").lower() == "100-continue":
                    csock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = _strip_header(head, "expect")
                body = _read_body(creader, headers)
                if fault == "503":
                    payload = b"" if method == "HEAD" else SLOWDOWN_BODY
                    csock.sendall(
                        b"HTTP/1.1 503 Slow Down\r\n"
                        b"Content-Type: application/xml\r\n"
                        b"x-amz-request-id: FAULTPROXY\r\n"
                        b"Connection: close\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(SLOWDOWN_BODY) + payload
                    )
                    with contextlib.suppress(OSError):
                        csock.shutdown(socket.SHUT_WR)
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=self.io_timeout)
                    with self._lock:
                        self._socks.add(upstream)
                    ureader = upstream.makefile("rb")
                with self._lock:
                    self.requests.append((method, request_line.split(" ")[1], headers.get("range")))
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    upstream.sendall(head + body)
                    close_after = self._relay_response(ureader, csock, method)
                finally:
                    with self._lock:
                        self.in_flight -= 1
                if close_after or "close" in headers.get("connection", "").lower():
                    return
        except (_Closed, OSError, ValueError):
            return
        finally:
            for s in (csock, upstream):
                if s is None:
                    continue
                with contextlib.suppress(OSError):
                    s.close()
                with self._lock:
                    self._socks.discard(s)
            with self._lock:
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def _relay_response(self, ureader, csock: socket.socket, method: str) -> bool:
        """Forward one response; True when the connection must be closed afterwards."""
        while True:
            head = _read_head(ureader)
            if head is None:
                raise _Closed("upstream closed before answering")
            status_line, headers = _parse_headers(head)
            try:
                status = int(status_line.split(" ", 2)[1])
            except (IndexError, ValueError):
                raise _Closed(f"bad upstream status line {status_line!r}")
            if 100 <= status < 200:
                continue  # we already answered 100-continue ourselves
            break
        close = "close" in headers.get("connection", "").lower()
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = _read_chunked(ureader)
        elif "content-length" in headers:
            body = _read_exact(ureader, int(headers["content-length"]))
        else:
            body = ureader.read()  # until EOF
            close = True
        csock.sendall(head + body)
        return close

