"""Shared pytest setup."""


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs pip/npm to reach the package registries (skips if not)")
