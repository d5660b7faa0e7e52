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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An untrained tiny hybrid model saved with a real tokenizer (read-only for the tests)."""
    import torch

    from raybench.config import validate_config
    from raybench.data.synthetic import generate
    from raybench.data.tokenizer import build_tokenizer, tokenizer_corpus
    from raybench.model.vlm import HybridVLM

    out = tmp_path_factory.mktemp("tiny_model") / "model"
    tok = build_tokenizer(tokenizer_corpus(generate(60, 32, 0, "train")))
    cfg = validate_config({"model": {"preset": "hybrid", "size": "tiny"}})
    torch.manual_seed(0)
    HybridVLM.for_tokenizer(cfg.model, tok).save_pretrained(out)
    tok.save_pretrained(str(out))
    return out
