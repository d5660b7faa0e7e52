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


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo process group in this process and its device mesh, for FSDP2 tests."""
    import os

    import torch.distributed as dist

    from raybench.net import free_port
    from raybench.train.parallel import build_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield build_mesh(1, "cpu")
    dist.destroy_process_group()
