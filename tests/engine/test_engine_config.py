"""config.json parsing (both rope formats) and rotary frequencies against transformers."""

import pytest
import torch

from zerostart.engine import EngineError
from zerostart.engine._config import ModelShape
from zerostart.engine._rope import inv_freq

BASE = dict(architectures=["LlamaForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"type": "linear", "factor": 2.0},  # the older key
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 512},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512, "beta_fast": 16, "mscale": 1.0,
     "mscale_all_dim": 0.5},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: (s or {}).get("rope_type", (s or {}).get("type", "none")))
def test_rope_frequencies_equal_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = dict(BASE, rope_theta=50000.0)
    if scaling:
        raw["rope_scaling"] = dict(scaling)
    ours = ModelShape.from_dict(raw)  # the transformers 4 form: rope_theta + rope_scaling
    hf = transformers.LlamaConfig(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()})
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type == "default":
        ref, scale = 1.0 / (50000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16)), 1.0
    else:
        ref, scale = ROPE_INIT_FUNCTIONS[rope_type](hf)
    freqs, our_scale = inv_freq(ours.rope, ours.head_dim)
    torch.testing.assert_close(freqs, ref, rtol=0, atol=0)
    assert our_scale == pytest.approx(scale)
    # the transformers 5 form (rope_parameters) reads the same
    raw5 = {k: v for k, v in raw.items() if k not in ("rope_theta", "rope_scaling")}
    raw5["rope_parameters"] = dict(hf.rope_parameters)
    assert ModelShape.from_dict(raw5).rope == ours.rope


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unsupported architecture"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_size=-1), "hidden_size"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope type 'dynamic'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 2.0}), "low_freq_factor"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(architectures=["MistralForCausalLM"], sliding_window="big"), "sliding_window"),
])
def test_bad_configs_name_the_key(change, message):
    with pytest.raises(EngineError, match=message):
        ModelShape.from_dict({**BASE, **change})


def test_model_type_without_architectures():
    raw = {k: v for k, v in BASE.items() if k != "architectures"}
    assert ModelShape.from_dict({**raw, "model_type": "qwen3"}).family == "qwen3"


def test_qwen_sliding_layers():
    raw = {**BASE, "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 4, "sliding_window": 16}
    assert ModelShape.from_dict(raw).sliding_windows == (None,) * 4  # use_sliding_window is off
    on = ModelShape.from_dict({**raw, "use_sliding_window": True, "max_window_layers": 2})
    assert on.sliding_windows == (None, None, 16, 16)
    typed = ModelShape.from_dict({**raw, "use_sliding_window": True, "layer_types": [
        "sliding_attention", "full_attention", "sliding_attention", "full_attention"]})
    assert typed.sliding_windows == (16, None, 16, None)
