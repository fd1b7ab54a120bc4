pytest_plugins = ["tests.conftest_cloud"]
