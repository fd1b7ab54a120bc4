pytest_plugins = ["tests.conftest_cloud"]


import pytest


@pytest.fixture(autouse=True)
def _stop_lock_heartbeats():
    """Managers that tests leave open must not keep heartbeating into stores (and servers) that are gone."""
    yield
    from skyrl_callbacks.lock import stop_heartbeats

    stop_heartbeats()
