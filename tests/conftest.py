import os

import torch

# Without CUDA the Triton kernels can only run in Triton's CPU interpreter, which must be switched on
# before any @triton.jit function is defined (i.e. before m2train.kernels is imported by a test module).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_model_cfg(arch: str = "m2_bert", **overrides):
    """A small but complete config of each architecture for fast CPU tests."""
    from m2train.config import ModelConfig

    base = dict(vocab_size=101, hidden_size=32, num_layers=2, intermediate_size=64, max_seq_len=40,
                filter_order=16, num_heads=4, hidden_dropout=0.0)
    if arch in ("m2_gpt", "gpt"):
        base.update(bidirectional=False, position_embeddings=(arch == "gpt"), layer_norm_eps=1e-5)
    base.update(overrides)
    return ModelConfig(arch=arch, **base)


def pytest_configure(config):
    # pytest-xdist's marker (registered here too, so runs without xdist do not warn about it)
    config.addinivalue_line("markers", "xdist_group(name): with --dist loadgroup, tests of one group run on "
                            "one worker, one after another")


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need a CUDA device: without one they are skipped (not failed), so the same
    suite runs on a laptop and `pytest -m gpu` on a GPU node."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
