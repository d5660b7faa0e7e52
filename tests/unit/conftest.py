"""Unit tests are Ray-free: several assert that a bad input fails before Ray starts."""

import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def no_ray_from_integration_tests():
    """The integration tests' session Ray (tests/integration/conftest.py) outlives them when
    both directories run in one pytest session: stop it before the first unit test."""
    ray = sys.modules.get("ray")  # not imported: nothing to stop, and no reason to import it
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    yield
