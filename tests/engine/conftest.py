import os

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny models here are latency bound: one intra-op thread is faster on a shared 2-core
    machine than two threads waiting on each other. Restored after each module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny demo model (Llama architecture, random weights), written once per session."""
    from zerostart.engine.demo import write_demo_model

    return write_demo_model(str(tmp_path_factory.mktemp("demo") / "tiny"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir):
    from zerostart.engine import Engine, EngineConfig

    engine = Engine.from_pretrained(tiny_dir, device="cpu", dtype="float32", config=EngineConfig(max_num_seqs=4, seed=1234))
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def hf_tiny(tiny_dir):
    """transformers' model and tokenizer for the same checkpoint, in float32."""
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    return model, tok


@pytest.fixture(scope="session")
def child_env():
    """Environment for a child process that must import this checkout's zerostart."""
    import zerostart

    root = os.path.dirname(os.path.dirname(os.path.abspath(zerostart.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
