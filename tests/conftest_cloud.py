"""Pytest plugin: real S3 (moto) and GCS (gcp-storage-emulator) servers and a fault proxy.

Register with ``pytest_plugins = ["tests.conftest_cloud"]`` in ``tests/conftest.py``.

Fixtures:

* ``s3_server`` (session): a :class:`tests.servers.MotoS3Server` with ``endpoint_url``,
  ``storage_options`` (``fsspec.filesystem("s3", **opts)``), ``make_bucket(prefix)``,
  ``client()`` (botocore) and ``reset()``. AWS test credentials and
  ``AWS_DEFAULT_REGION=us-east-1`` are in ``os.environ`` while it lives.
* ``gcs_server`` (session): a :class:`tests.servers.GcsEmulator` with ``endpoint_url``,
  ``storage_options`` (``fsspec.filesystem("gcs", **opts)``) and ``make_bucket(prefix)``.
* ``fault_proxy`` (function): a started :class:`tests.servers.FaultProxy` in front of
  ``s3_server``, no faults scheduled; call ``configure(mode=..., first_n=..., every_nth=...)``
  and use ``fault_proxy.storage_options``.
* ``s3_bucket`` / ``gcs_bucket`` (function): a fresh bucket name on each server.

Servers are skipped (not failed) when moto / gcp-storage-emulator are not installed.
"""

from __future__ import annotations

import importlib.util
import os

# gcsfs >= 2025.x probes each bucket for zonal/HNS support through gRPC unless this is
# false; against the emulator that probe hangs for 60 s. It is read when gcsfs is
# imported, so it has to be set before any test module imports gcsfs.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import pytest  # noqa: E402

from tests.servers import S3_TEST_CREDENTIALS, FaultProxy, GcsEmulator, MotoS3Server  # noqa: E402


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{what} needs the '{module}' package")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server for the whole session (see module docstring)."""
    _require("moto", "s3_server")
    _require("s3fs", "s3_server")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3_TEST_CREDENTIALS.items():
            mp.setenv(k, v)
        server = MotoS3Server()
        try:
            server.start()
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    """An in-memory GCS emulator for the whole session (see module docstring)."""
    _require("gcp_storage_emulator", "gcs_server")
    _require("gcsfs", "gcs_server")
    server = GcsEmulator()
    try:
        server.start()
        yield server
    finally:
        server.stop()


class _ProxyHandle:
    """A FaultProxy plus the s3fs storage options that go through it."""

    def __init__(self, proxy: FaultProxy) -> None:
        self._proxy = proxy

    def __getattr__(self, name):
        return getattr(self._proxy, name)

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self._proxy.endpoint_url, "key": "testing", "secret": "testing"}


@pytest.fixture
def fault_proxy(s3_server):
    """A fault-injecting proxy in front of ``s3_server``; starts with no faults."""
    proxy = FaultProxy("127.0.0.1", s3_server.port)
    try:
        proxy.start()
        yield _ProxyHandle(proxy)
    finally:
        proxy.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on ``s3_server``."""
    return s3_server.make_bucket()


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    """A fresh bucket on ``gcs_server``."""
    return gcs_server.make_bucket()
