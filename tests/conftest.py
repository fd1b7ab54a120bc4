pytest_plugins = ["tests.conftest_cloud"]


import os

import pytest

# Every checkpoint file with tensors takes the multi-threaded writer (by default only files of
# 64 MiB and more do), here and in the subprocesses tests start: the whole suite covers that path.
os.environ.setdefault("SKYRL_PARALLEL_WRITE_MIN_BYTES", "0")


@pytest.fixture(autouse=True)
def _restore_environ():
    """A test that runs Lightning in this process leaves MASTER_ADDR/MASTER_PORT/LOCAL_RANK/... in
    os.environ; the subprocesses of later tests inherit them (a worker then believes it runs under
    torchrun, a DDP launch reuses a dead port). Every test gets the environment back as it found it."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _stop_lock_heartbeats():
    """Managers that tests leave open must not keep heartbeating into stores (and servers) that are gone."""
    yield
    from skyrl_callbacks.lock import stop_heartbeats

    stop_heartbeats()
