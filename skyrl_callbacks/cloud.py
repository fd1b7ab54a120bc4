"""Object-store transfers for the checkpoint storage layer: retries, concurrency, moves.

This module holds the few operations that checkpointing needs from S3/GCS-like stores,
made robust and fast:

* :func:`retrying` -- call a function with exponential backoff and jitter on transient
  errors (5xx, S3 ``SlowDown``/throttling, connection resets, timeouts), within a deadline;
* :func:`upload_files` / :func:`upload_dir` -- upload staged local files (a list, or a
  whole directory), many files at a time, large files as multipart uploads, each file
  retried on its own; the checkpoint manager uploads each rank's files with
  :func:`upload_files` (through ``Storage.upload_files``);
* :func:`download_files` -- the same for downloads, atomically per file;
* :func:`copy_delete_move` -- a move that is a server-side copy followed by a delete on
  object stores (some stores and emulators have no ``mv``: the GCS emulator answers 501);
* :func:`open_for_write` -- a streaming writer for direct upload, for callers that cannot
  stage to local disk.

Stage locally, then upload (the default) versus streaming
---------------------------------------------------------
A checkpoint is written as ``torch.save``/DCP files into a local staging directory and
then uploaded with :func:`upload_files` (``cloud_upload: "staged"``). Streaming each file straight to the object store
(:func:`open_for_write`) is the alternative; staging is the default because:

* **Retries are possible.** A staged file can be re-read, so a failed request is retried
  per part (inside s3fs/botocore) and per file (here) without involving the writer. A
  stream cannot be rewound: once parts are sent, a failure on the last part or on the
  final commit can only be repaired by producing the whole file again.
* **Full bandwidth.** ``upload_dir`` keeps ``max_concurrency`` files and, for big files,
  several parts per file in flight, which is what saturates an object store's
  per-connection-limited bandwidth. ``torch.save`` into a stream is one sequential writer,
  one part at a time.
* **Fast writers.** ``torch.save`` and DCP write local files at disk/page-cache speed and
  release the training loop early; they do many small writes and seeks that suit a local
  file and not an HTTP stream.

Streaming (``cloud_upload: "stream"``) is for hosts without enough local disk for one
checkpoint; its limits are described in :func:`open_for_write`. docs/cloud.md has both
modes, the commit protocol and benchmark numbers.

Only ``fsspec`` is needed to import this module; ``botocore``, ``aiohttp`` and ``gcsfs``
exception types are recognised only when those packages are already imported.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import io
import logging
import os
import random
import sys
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar, Union

from skyrl_callbacks.errors import StorageError

# Our own generator: retries must never consume the training loop's global `random` stream
# (that would break bitwise exact resume for code that draws from it).
_JITTER = random.Random()

logger = logging.getLogger(__name__)

__all__ = [
    "retrying",
    "is_transient",
    "upload_dir",
    "upload_files",
    "download_files",
    "copy_delete_move",
    "open_for_write",
    "StreamingWriter",
    "DEFAULT_MULTIPART_THRESHOLD",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PART_CONCURRENCY",
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_READ_TIMEOUT_S",
    "S3FS_ATTEMPTS",
    "GCSFS_ATTEMPTS",
    "network_timeouts",
    "with_network_defaults",
    "tune_client",
    "endpoint_of",
]

T = TypeVar("T")

MiB = 1 << 20
#: Files at least this large are uploaded as multipart (S3) / resumable (GCS) uploads.
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
#: Part size of multipart uploads, and block size of streaming writers.
DEFAULT_CHUNK_SIZE = 16 * MiB
#: Parts of one file in flight at once (s3fs); memory is about
#: ``max_concurrency * part_concurrency * chunk_size``.
DEFAULT_PART_CONCURRENCY = 4

_S3_MIN_PART = 5 * MiB
_S3_MAX_PUT = 5 << 30  # single PUT limit
_S3_MAX_PARTS = 10_000
_GCS_CHUNK_ALIGN = 256 * 1024  # resumable upload chunks must be multiples of 256 KiB

# Error codes (S3 and generic) that mean "try again later".
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "InternalError",
        "InternalServerError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
        "IDPCommunicationError",
        "OperationAborted",
        "500",
        "502",
        "503",
        "504",
        "429",
        "408",
    }
)
# Never retried, whatever else the error looks like.
_PERMANENT_CODES = frozenset(
    {
        "NoSuchBucket",
        "NoSuchKey",
        "NoSuchUpload",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidBucketName",
        "InvalidRequest",
        "InvalidArgument",
        "EntityTooLarge",
        "EntityTooSmall",
        "InvalidPart",
        "InvalidPartOrder",
        "MethodNotAllowed",
        "NotImplemented",
        "PreconditionFailed",
        "400",
        "401",
        "403",
        "404",
        "405",
        "409",
        "412",
        "501",
    }
)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EBUSY,  # s3fs maps SlowDown/ServiceUnavailable/503 to EBUSY
        errno.EAGAIN,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETRESET,
    }
)
_TRANSIENT_PHRASES = (
    "slowdown",
    "slow down",
    "reduce your request rate",
    "service unavailable",
    "internal server error",
    "connection reset",
    "connection aborted",
    "connection was closed",
    "server disconnected",
    "broken pipe",
    "timed out",
    "timeout",
    "too many requests",
    "throttl",
)


# ---------------------------------------------------------------------------------------
# Error classification and retries
# ---------------------------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterable[BaseException]:
    """``exc`` and its causes/contexts (s3fs wraps botocore errors in OSError)."""
    seen: set[int] = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen and len(seen) < 16:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _classify_one(exc: BaseException) -> Optional[bool]:
    """True: transient; False: permanent; None: this exception alone does not tell."""
    if isinstance(exc, StorageError):
        return False  # already retried by an inner `retrying`
    if isinstance(exc, (FileNotFoundError, PermissionError, FileExistsError)):
        return False
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, NotImplementedError)):
        return False

    # botocore: ClientError carries the S3 error code and HTTP status.
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _PERMANENT_CODES:
            return False
        if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS:
            return True
        if isinstance(status, int) and 400 <= status < 500:
            return False
        if isinstance(status, int) and status >= 500 and status != 501:
            return True

    bce = sys.modules.get("botocore.exceptions")
    if bce is not None:
        transient_types = tuple(
            getattr(bce, n)
            for n in (
                "ConnectionError",  # EndpointConnectionError, ConnectionClosedError, timeouts
                "HTTPClientError",
                "IncompleteReadError",
                "ResponseStreamingError",
                "ReadTimeoutError",
                "ConnectTimeoutError",
            )
            if hasattr(bce, n)
        )
        if transient_types and isinstance(exc, transient_types):
            return True
        no_creds = getattr(bce, "NoCredentialsError", None)
        if no_creds is not None and isinstance(exc, no_creds):
            return False

    aio = sys.modules.get("aiohttp")
    if aio is not None:
        cre = getattr(aio, "ClientResponseError", None)
        if cre is not None and isinstance(exc, cre):
            return getattr(exc, "status", None) in _TRANSIENT_STATUS
        cce = getattr(aio, "ClientConnectionError", None)
        cpe = getattr(aio, "ClientPayloadError", None)
        if cce is not None and isinstance(exc, cce):
            return True
        if cpe is not None and isinstance(exc, cpe):
            return True

    # gcsfs HttpError (code attribute); 502 arrives as requests' ProxyError.
    if type(exc).__name__ == "HttpError" and hasattr(exc, "code"):
        try:
            return int(exc.code) in _TRANSIENT_STATUS
        except (TypeError, ValueError):
            return None
    req = sys.modules.get("requests.exceptions")
    if req is not None:
        if isinstance(exc, (req.ConnectionError, req.Timeout, req.ChunkedEncodingError)):
            return True

    fse = sys.modules.get("fsspec.exceptions")
    if fse is not None and isinstance(exc, getattr(fse, "FSTimeoutError", ())):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):  # reset/aborted/refused/pipe
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if isinstance(exc, (TypeError, ValueError, AttributeError, KeyError, AssertionError)):
        return False  # programming or request errors: retrying cannot help
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying.

    Transient: HTTP 5xx (but 501), 408, 429, S3 ``SlowDown``/throttling codes, connection
    reset/aborted/refused, broken pipes, timeouts (botocore, aiohttp, requests, OSError
    errno, gcsfs ``HttpError``). Permanent: 4xx such as 403/404, ``NoSuchBucket``,
    ``AccessDenied``, missing files, 501 Not Implemented, and :class:`StorageError` (an
    inner retry loop already gave up). The cause chain is inspected, since s3fs re-raises
    botocore errors as ``OSError``; the first exception in the chain with a definite
    answer decides. Otherwise the message is matched against known transient phrases.

    Args:
        exc: the exception raised by a storage call.

    Returns:
        True to retry, False to give up at once.
    """
    for e in _chain(exc):
        verdict = _classify_one(e)
        if verdict is not None:
            return verdict
    text = " ".join(str(e) for e in _chain(exc)).lower()
    return any(p in text for p in _TRANSIENT_PHRASES)


def retrying(
    fn: Callable[[], T],
    *,
    what: str,
    deadline_s: float = 120,
    base_delay: float = 0.2,
    max_delay: float = 5,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn()`` and retry it with exponential backoff and jitter on transient errors.

    The n-th retry waits a random time in ``[d/2, d]`` with
    ``d = min(max_delay, base_delay * 2**(n-1))``. No retry is started when its wait would
    end after ``deadline_s`` seconds from the first call. The deadline is checked between
    attempts: an attempt in progress is not interrupted, so the total time is at most
    ``deadline_s`` plus one attempt (client libraries retry inside an attempt too; with
    :class:`~skyrl_callbacks.storage.Storage`'s defaults s3fs makes up to 3 requests, gcsfs up
    to 2, each bounded by the network timeouts of :func:`with_network_defaults`).

    Args:
        fn: the operation, without arguments; it must be safe to repeat (idempotent).
        what: what is being done, for log and error messages (``"upload a -> s3://b/a"``).
        deadline_s: total time budget for all attempts, in seconds.
        base_delay: wait before the first retry (upper bound), in seconds.
        max_delay: longest wait between two attempts, in seconds.
        sleep: the sleep function (tests).

    Returns:
        What ``fn`` returns.

    Raises:
        StorageError: a transient error persisted until the deadline; it names ``what``,
            the number of attempts and the last error, which is its ``__cause__``.
        Exception: a non-transient error (403, 404, ``NoSuchBucket``...) is re-raised
            unchanged at its first occurrence.
    """
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            elapsed = time.monotonic() - start
            delay = min(max_delay, base_delay * (2 ** (attempt - 1)))
            delay = _JITTER.uniform(delay / 2, delay)
            if elapsed + delay > deadline_s:
                raise StorageError(
                    f"{what} failed after {attempt} attempt{'s' if attempt > 1 else ''} in "
                    f"{elapsed:.1f}s (deadline {deadline_s:g}s) on transient errors; last "
                    f"error: {type(exc).__name__}: {exc}. Check the store's health and "
                    "endpoint, or raise the deadline."
                ) from exc
            logger.warning(
                "%s: transient error on attempt %d (%s: %s); retrying in %.2fs",
                what,
                attempt,
                type(exc).__name__,
                exc,
                delay,
            )
            sleep(delay)


# ---------------------------------------------------------------------------------------
# Network timeouts
# ---------------------------------------------------------------------------------------

#: Longest wait for a TCP connection to the store, unless ``storage_options`` sets one.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
#: Longest silence while waiting for (a part of) an answer, unless ``storage_options`` sets one.
#: Sending a request body is not limited by it: a large upload may take as long as it needs.
DEFAULT_READ_TIMEOUT_S = 20.0
#: Attempts of one request inside s3fs (botocore's own retries are off): quick faults
#: (resets, 503s) of one part of a multipart upload are retried there, without
#: restarting the file.
S3FS_ATTEMPTS = 3
#: Attempts of one request inside gcsfs (its default, 6, sleeps about 31 s in between).
GCSFS_ATTEMPTS = 2


def network_timeouts(deadline_s: float) -> tuple[float, float]:
    """``(connect, read)`` timeouts, in seconds, for a retry budget of ``deadline_s``.

    ``min(DEFAULT_*_TIMEOUT_S, max(1, deadline_s / (2 * S3FS_ATTEMPTS)))``: a store that
    accepts connections and never answers costs one attempt at most ``S3FS_ATTEMPTS``
    read timeouts (plus s3fs's sleeps, 0.6 s), about half the budget, so that
    :func:`retrying` gives up at most that long after its deadline (docs/cloud.md).
    """
    share = max(1.0, float(deadline_s) / (2 * S3FS_ATTEMPTS))
    return min(DEFAULT_CONNECT_TIMEOUT_S, share), min(DEFAULT_READ_TIMEOUT_S, share)


def with_network_defaults(protocol: str, storage_options: Mapping[str, Any], deadline_s: float) -> dict:
    """``storage_options`` plus connect/read timeouts and bounded client retries, where unset.

    * S3 (s3fs/botocore): ``config_kwargs`` gets ``connect_timeout``, ``read_timeout``
      (:func:`network_timeouts`) and ``retries={"total_max_attempts": 1}`` (botocore's
      retries off: s3fs retries each request ``S3FS_ATTEMPTS`` times, :func:`retrying`
      the whole operation). Keys the user set in ``config_kwargs`` win.
    * GCS (gcsfs/aiohttp): ``requests_timeout`` becomes
      ``aiohttp.ClientTimeout(sock_connect=connect, sock_read=read)`` (no total limit, so
      long transfers are not cut), unless set.
    * Other protocols: unchanged.
    """
    opts = dict(storage_options)
    connect, read = network_timeouts(deadline_s)
    if protocol in ("s3", "s3a"):
        ck = dict(opts.get("config_kwargs") or {})
        ck.setdefault("connect_timeout", connect)
        ck.setdefault("read_timeout", read)
        ck.setdefault("retries", {"total_max_attempts": 1})
        opts["config_kwargs"] = ck
    elif protocol in ("gs", "gcs"):
        if "requests_timeout" not in opts:
            try:
                import aiohttp

                opts["requests_timeout"] = aiohttp.ClientTimeout(
                    total=None, sock_connect=connect, sock_read=read
                )
            except ImportError:  # pragma: no cover - gcsfs needs aiohttp
                pass
    return opts


def tune_client(fs: Any) -> None:
    """Bound the client library's own retries of one request.

    s3fs makes ``S3FS_ATTEMPTS`` attempts instead of its default 5; gcsfs makes
    ``GCSFS_ATTEMPTS`` instead of its fixed 6 (which sleep about 1+2+4+8+16 s between
    them, longer than a short retry deadline): its request method is re-wrapped, on this
    filesystem instance only, with gcsfs's own retry decorator and fewer attempts. Each
    attempt may wait a full read timeout on a silent store.
    """
    if _is_s3(fs):
        fs.retries = S3FS_ATTEMPTS
    elif _is_gcs(fs) and not getattr(fs, "_skyrl_tuned", False):
        try:
            import types

            from gcsfs.retry import retry_request

            raw = getattr(type(fs)._request, "__wrapped__", None)
            if raw is not None:
                fs._request = types.MethodType(retry_request(retries=GCSFS_ATTEMPTS)(raw), fs)
                fs._skyrl_tuned = True
        except Exception as exc:  # noqa: BLE001 - another gcsfs: keep its retries
            logger.debug("could not bound gcsfs's retries: %s", exc)


def endpoint_of(protocol: str, storage_options: Mapping[str, Any]) -> str:
    """The store's address, for error messages (``http://127.0.0.1:9000``,
    ``https://storage.googleapis.com``...); ``""`` for local paths and unknown stores."""
    opts = storage_options or {}
    if protocol in ("s3", "s3a"):
        url = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
        url = url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return str(url) if url else "AWS S3 (default endpoint)"
    if protocol in ("gs", "gcs"):
        url = opts.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
        return str(url) if url else "https://storage.googleapis.com"
    return ""


# ---------------------------------------------------------------------------------------
# Concurrent transfers
# ---------------------------------------------------------------------------------------


def _protocol(fs: Any) -> str:
    proto = getattr(fs, "protocol", "")
    if isinstance(proto, (tuple, list)):
        proto = proto[0] if proto else ""
    return str(proto)


def _is_s3(fs: Any) -> bool:
    return type(fs).__name__ == "S3FileSystem" or _protocol(fs) in ("s3", "s3a")


def _is_gcs(fs: Any) -> bool:
    return type(fs).__name__ == "GCSFileSystem" or _protocol(fs) in ("gs", "gcs")


def _is_object_store(fs: Any) -> bool:
    return _is_s3(fs) or _is_gcs(fs)


def _align_up(n: int, align: int) -> int:
    return max(align, -(-n // align) * align)


def _join(prefix: str, rel: str) -> str:
    return prefix.rstrip("/") + "/" + rel.lstrip("/")


def _put_kwargs(
    fs: Any, size: int, multipart_threshold: int, chunk_size: int, part_concurrency: int
) -> dict:
    """Per-backend ``put_file`` options that implement threshold/chunk size."""
    if _is_s3(fs):
        # s3fs uses one PUT when size < 2 * chunksize, else multipart parts of chunksize.
        if size >= multipart_threshold or size >= _S3_MAX_PUT:
            chunk = max(_S3_MIN_PART, min(chunk_size, size // 2))
            chunk = max(chunk, -(-size // _S3_MAX_PARTS))  # at most 10,000 parts
        else:
            chunk = size // 2 + 1  # one PUT
        return {"chunksize": chunk, "max_concurrency": max(1, part_concurrency)}
    if _is_gcs(fs):
        # gcsfs: < 5 MiB one request; else a resumable upload in chunks (sequential).
        chunk = chunk_size if size >= multipart_threshold else max(size, 1)
        return {"chunksize": _align_up(chunk, _GCS_CHUNK_ALIGN)}
    return {}


def _run_all(
    tasks: list[tuple[str, Callable[[], Any]]], max_concurrency: int, verb: str
) -> list[Any]:
    """Run ``(name, fn)`` tasks on a thread pool; on the first failure cancel the rest.

    The fsspec async filesystems run all I/O on their own event loop; the threads only
    wait on it, so ``max_concurrency`` is the number of transfers in flight.
    """
    if not tasks:
        return []
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    if max_concurrency == 1 or len(tasks) == 1:
        return [fn() for _, fn in tasks]
    results: list[Any] = [None] * len(tasks)
    with cf.ThreadPoolExecutor(
        max_workers=min(max_concurrency, len(tasks)), thread_name_prefix=f"skyrl-{verb}"
    ) as pool:
        futures = {pool.submit(fn): i for i, (_, fn) in enumerate(tasks)}
        try:
            for fut in cf.as_completed(futures):
                results[futures[fut]] = fut.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return results


def _walk_files(local_dir: str) -> list[tuple[str, str, int]]:
    """``(relative posix path, absolute path, size)`` of every file under ``local_dir``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(local_dir, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if not os.path.isfile(full):
                continue  # sockets, broken links
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            out.append((rel, full, os.path.getsize(full)))
    return out


def upload_dir(
    fs: Any,
    local_dir: Union[str, os.PathLike],
    remote_prefix: str,
    *,
    max_concurrency: int = 8,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    part_concurrency: int = DEFAULT_PART_CONCURRENCY,
    deadline_s: float = 120,
) -> dict[str, int]:
    """Upload every file under ``local_dir`` to ``remote_prefix``, concurrently.

    ``local_dir/a/b.pt`` goes to ``remote_prefix/a/b.pt`` (never nested under the local
    directory's name, whether or not the prefix exists). Empty directories are not
    represented. Files are uploaded largest first, ``max_concurrency`` at a time; each
    file is retried as a whole with :func:`retrying` (inside an attempt s3fs/botocore
    retry single requests, i.e. single parts). Files of at least ``multipart_threshold``
    bytes are uploaded in parts of ``chunk_size`` bytes: S3 multipart uploads with
    ``part_concurrency`` parts in flight (s3fs sends one request below
    ``2 * chunk_size`` whatever the threshold; parts are at least 5 MiB), GCS resumable
    uploads with chunks rounded up to 256 KiB. An upload that fails is aborted by s3fs, so
    a retry starts clean.

    Args:
        fs: an fsspec filesystem (s3fs, gcsfs, local, memory...).
        local_dir: the staged directory.
        remote_prefix: destination "directory" (with or without protocol).
        max_concurrency: files in flight at once.
        multipart_threshold: size from which a file is sent in parts.
        chunk_size: part size, in bytes.
        part_concurrency: parts of one file in flight at once (S3).
        deadline_s: retry budget of each file, in seconds (see :func:`retrying`).

    Returns:
        ``{relative posix path: size in bytes}`` of every uploaded file.

    Raises:
        StorageError: a file could not be uploaded within its deadline.
        FileNotFoundError: ``local_dir`` does not exist (or the bucket does not).
    """
    local_dir = os.fspath(local_dir)
    if not os.path.isdir(local_dir):
        raise FileNotFoundError(errno.ENOENT, "upload_dir: no such local directory", local_dir)
    files = _walk_files(local_dir)
    sizes = upload_files(
        fs,
        [(full, _join(remote_prefix, rel)) for rel, full, _size in files],
        max_concurrency=max_concurrency,
        multipart_threshold=multipart_threshold,
        chunk_size=chunk_size,
        part_concurrency=part_concurrency,
        deadline_s=deadline_s,
    )
    with contextlib.suppress(Exception):
        fs.invalidate_cache(remote_prefix)
    by_remote = {_join(remote_prefix, rel): rel for rel, _full, _size in files}
    return {by_remote[r]: n for r, n in sorted(sizes.items(), key=lambda kv: by_remote[kv[0]])}


def upload_files(
    fs: Any,
    pairs: Union[Mapping[str, str], Iterable[tuple[str, str]]],
    *,
    max_concurrency: int = 8,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    part_concurrency: int = DEFAULT_PART_CONCURRENCY,
    deadline_s: float = 120,
) -> dict[str, int]:
    """Upload ``{local path: remote path}`` concurrently; the engine behind :func:`upload_dir`.

    Files go largest first, ``max_concurrency`` at a time, each retried as a whole with
    :func:`retrying`; multipart/resumable uploads as described in :func:`upload_dir`. The
    checkpoint manager uses this directly to upload exactly the files one rank wrote.

    Returns:
        ``{remote path: size in bytes}``.

    Raises:
        StorageError: a file could not be uploaded within its deadline.
        FileNotFoundError: a local file (or the bucket) does not exist.
    """
    items = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
    files = sorted(((os.fspath(l), r, os.path.getsize(l)) for l, r in items), key=lambda f: -f[2])

    def task(full: str, rpath: str, size: int):
        kwargs = _put_kwargs(fs, size, multipart_threshold, chunk_size, part_concurrency)

        def put() -> None:
            fs.put_file(full, rpath, **kwargs)

        retrying(put, what=f"upload {full} -> {rpath}", deadline_s=deadline_s)
        return rpath, size

    t0 = time.monotonic()
    results = _run_all(
        [(r, (lambda f=full, r=r, s=size: task(f, r, s))) for full, r, size in files],
        max_concurrency,
        "upload",
    )
    sizes = dict(results)
    total = sum(sizes.values())
    dt = time.monotonic() - t0
    logger.debug(
        "uploaded %d files, %.1f MiB in %.2fs (%.1f MiB/s)",
        len(sizes),
        total / MiB,
        dt,
        total / MiB / dt if dt > 0 else float("inf"),
    )
    return sizes


def download_files(
    fs: Any,
    paths: Union[Mapping[str, str], Iterable[tuple[str, str]]],
    *,
    max_concurrency: int = 8,
    deadline_s: float = 120,
) -> dict[str, int]:
    """Download ``{remote path: local path}`` concurrently, each file retried.

    Each file is written to a temporary sibling and renamed into place, so a local path
    holds either nothing or the complete file. Parent directories are created.

    Args:
        fs: an fsspec filesystem.
        paths: mapping (or pairs) of remote path to local destination path.
        max_concurrency: files in flight at once.
        deadline_s: retry budget of each file, in seconds.

    Returns:
        ``{remote path: size in bytes}``.

    Raises:
        FileNotFoundError: a remote file does not exist (not retried).
        StorageError: a file could not be downloaded within its deadline.
    """
    pairs = list(paths.items()) if isinstance(paths, Mapping) else list(paths)

    def task(rpath: str, lpath: str):
        lpath = os.fspath(lpath)
        parent = os.path.dirname(os.path.abspath(lpath))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(lpath)}.part-{uuid.uuid4().hex[:8]}")

        def get() -> None:
            fs.get_file(rpath, tmp)

        try:
            retrying(get, what=f"download {rpath} -> {lpath}", deadline_s=deadline_s)
            os.replace(tmp, lpath)
        finally:
            with contextlib.suppress(Exception):
                os.unlink(tmp)
        return rpath, os.path.getsize(lpath)

    results = _run_all(
        [(r, (lambda r=r, l=l: task(r, l))) for r, l in pairs], max_concurrency, "download"
    )
    return dict(results)


def copy_delete_move(
    fs: Any,
    src: str,
    dst: str,
    *,
    max_concurrency: int = 8,
    deadline_s: float = 120,
) -> list[str]:
    """Move a file or a "directory" ``src`` to ``dst``; copy + delete where needed.

    On S3/GCS the move is always a server-side copy of every object followed by the
    deletion of the sources (that is all ``mv`` does there, and gcsfs's ``mv`` first tries
    the ``moveTo`` API, which the GCS emulator answers with 501 after ~30 s of gcsfs
    retries). Other filesystems use their ``mv`` and fall back to copy + delete when it
    is unsupported (``NotImplementedError`` or HTTP 501). All copies finish before the
    first delete, so an interruption leaves a complete ``dst`` (and possibly leftovers of
    ``src``), never a lost file. A directory's files map to ``dst/<relative path>``.

    Args:
        fs: an fsspec filesystem.
        src: a file or directory prefix.
        dst: the destination path (a prefix when ``src`` is a directory).
        max_concurrency: objects copied/deleted at once.
        deadline_s: retry budget of each object operation, in seconds.

    Returns:
        The destination paths of the moved files, spelled like ``dst`` (with its
        protocol, if it has one).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        StorageError: a copy or delete kept failing until its deadline.
    """
    src_s = src.rstrip("/")
    dst_s = dst.rstrip("/")
    if not _is_object_store(fs):
        try:
            is_dir = fs.isdir(src_s)
            fs.mv(src_s, dst_s, recursive=is_dir)
            return [dst_s] if not is_dir else sorted(fs.find(dst_s))
        except Exception as exc:
            if not _mv_unsupported(exc):
                raise
            logger.info("mv %s -> %s is unsupported (%s); copying and deleting", src, dst, exc)

    files = retrying(lambda: fs.find(src_s), what=f"list {src_s}", deadline_s=deadline_s)
    strip = fs._strip_protocol
    base = strip(src_s)
    if not files:
        if retrying(lambda: fs.exists(src_s), what=f"stat {src_s}", deadline_s=deadline_s):
            files = [base]  # a "directory" marker or a file find() did not return
        else:
            raise FileNotFoundError(errno.ENOENT, "copy_delete_move: no such path", src)
    pairs = []
    for f in files:
        f = strip(f)
        if f == base:
            pairs.append((f, dst_s))
        else:
            rel = f[len(base) :].lstrip("/")
            pairs.append((f, _join(dst_s, rel)))

    def copy(s: str, d: str):
        retrying(lambda: fs.cp_file(s, d), what=f"copy {s} -> {d}", deadline_s=deadline_s)

    def delete(s: str):
        def rm() -> None:
            try:
                fs.rm_file(s)
            except FileNotFoundError:
                pass  # a previous attempt deleted it and then failed to answer

        retrying(rm, what=f"delete {s}", deadline_s=deadline_s)

    _run_all([(s, (lambda s=s, d=d: copy(s, d))) for s, d in pairs], max_concurrency, "copy")
    _run_all([(s, (lambda s=s: delete(s))) for s, _ in pairs], max_concurrency, "delete")
    with contextlib.suppress(Exception):
        fs.invalidate_cache(src_s)
        fs.invalidate_cache(dst_s)
    return [d for _, d in pairs]


def _mv_unsupported(exc: BaseException) -> bool:
    for e in _chain(exc):
        if isinstance(e, NotImplementedError):
            return True
        code = getattr(e, "code", None) or getattr(e, "status", None)
        if str(code) == "501":
            return True
        if "501" in str(e) and "not implemented" in str(e).lower():
            return True
    return False


# ---------------------------------------------------------------------------------------
# Streaming writes
# ---------------------------------------------------------------------------------------


class StreamingWriter(io.RawIOBase):
    """A write-only binary file that uploads to an object store as it is written.

    Returned by :func:`open_for_write`. Up to ``block_size`` bytes are kept in memory;
    a file that never grows beyond that is uploaded on :meth:`close` in one request
    retried with :func:`retrying`. A larger file is streamed through
    ``fs.open(path, "wb", block_size=block_size)`` (S3 multipart, GCS resumable upload),
    one block at a time.

    Leaving a ``with`` block by an exception, or calling :meth:`abort`, cancels the
    upload (aborts the multipart/resumable upload) instead of committing a truncated
    object, which is what a plain fsspec file would do.
    """

    def __init__(
        self, fs: Any, path: str, block_size: int, deadline_s: float, **open_kwargs: Any
    ) -> None:
        super().__init__()
        self.fs = fs
        self.path = path
        self.block_size = block_size
        self.deadline_s = deadline_s
        self._open_kwargs = open_kwargs
        self._buf = bytearray()
        self._f: Any = None
        self._pos = 0
        self._failed = False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def write(self, data) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("write to closed StreamingWriter")
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        try:
            if self._f is None:
                self._buf += mv
                if len(self._buf) > self.block_size:
                    self._f = self.fs.open(
                        self.path, "wb", block_size=self.block_size, **self._open_kwargs
                    )
                    buf, self._buf = self._buf, bytearray()
                    self._f.write(bytes(buf))
            else:
                self._f.write(mv)
        except Exception as exc:
            self._fail()
            raise self._stream_error("write", exc) from exc
        self._pos += n
        return n

    def flush(self) -> None:
        """No-op: data is sent a block at a time, and committed by :meth:`close`."""

    def close(self) -> None:
        """Commit the object. Retried when nothing was streamed yet.

        Raises:
            StorageError: the upload failed (the partial upload is aborted).
        """
        if self.closed:
            return
        try:
            if self._failed:
                return
            if self._f is None:
                data = bytes(self._buf)
                self._buf = bytearray()
                retrying(
                    lambda: self.fs.pipe_file(self.path, data),
                    what=f"write {self.path} ({len(data)} bytes)",
                    deadline_s=self.deadline_s,
                )
            else:
                try:
                    self._f.close()
                except Exception as exc:
                    self._fail()
                    raise self._stream_error("commit", exc) from exc
        finally:
            super().close()

    def abort(self) -> None:
        """Cancel the upload; nothing is committed. Idempotent."""
        if not self.closed:
            self._fail()
            super().close()

    def _fail(self) -> None:
        self._failed = True
        self._buf = bytearray()
        f, self._f = self._f, None
        if f is None:
            return
        try:
            discard = getattr(f, "discard", None)
            if callable(discard):
                discard()
        except Exception as exc:  # best effort: the store expires abandoned uploads
            logger.warning("could not abort the upload of %s: %s", self.path, exc)
        finally:
            try:
                f.closed = True  # fsspec files commit in close()/__del__: prevent it
            except Exception:
                pass

    def _stream_error(self, stage: str, exc: BaseException) -> StorageError:
        return StorageError(
            f"streaming upload of {self.path} failed at {stage} after {self._pos} bytes: "
            f"{type(exc).__name__}: {exc}. A stream cannot be rewound, so the upload was "
            "aborted; write the file again (or stage it locally and use upload_dir)."
        )

    def __exit__(self, et, ev, tb) -> None:
        if et is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        # Never commit from the garbage collector: an unclosed writer is an abandoned one.
        try:
            if not self.closed:
                self.abort()
        except Exception:
            pass


def open_for_write(
    fs: Any,
    path: str,
    *,
    block_size: int = DEFAULT_CHUNK_SIZE,
    deadline_s: float = 120,
    **open_kwargs: Any,
) -> StreamingWriter:
    """Open ``path`` for a streaming, direct upload (no local staging).

    Use as a context manager; the object exists only after a successful close::

        with open_for_write(fs, "s3://bucket/ckpt/model.pt") as f:
            torch.save(state, f)

    Limits (why staging + :func:`upload_dir` is the default):

    * Only a file of at most ``block_size`` bytes is retried on close by this layer (its
      bytes are still in memory). Larger files are sent block by block; a failure of a
      block or of the final commit that persists beyond the client library's own
      per-request retries raises :class:`StorageError`, and the whole file must be
      written again.
    * One block is in flight at a time: throughput is that of a single connection.
    * The writer is not seekable; ``torch.save`` handles that, DCP needs a directory.
    * Memory: up to ``block_size`` bytes (S3 parts must be >= 5 MiB; GCS blocks are
      rounded up to a multiple of 256 KiB).
    * Leaving the ``with`` block with an exception aborts the upload (no truncated
      object is committed).

    Args:
        fs: an fsspec filesystem.
        path: destination path.
        block_size: bytes buffered before a block is sent.
        deadline_s: retry budget of the one-request upload of a small file, in seconds.
        **open_kwargs: passed to ``fs.open`` (e.g. ``ContentType`` for s3fs).

    Returns:
        A :class:`StreamingWriter`.
    """
    if _is_s3(fs):
        block_size = max(block_size, _S3_MIN_PART)
    elif _is_gcs(fs):
        block_size = _align_up(block_size, _GCS_CHUNK_ALIGN)
    return StreamingWriter(fs, path, block_size, deadline_s, **open_kwargs)

