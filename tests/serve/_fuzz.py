"""Hypothesis strategies for request bodies: OpenAI's fields (and some it does not have) with
any JSON value, so that parsers and routes meet every shape a client could send."""

from __future__ import annotations

from hypothesis import strategies as st

json_value = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
FIELDS = ["model", "prompt", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
          "temperature", "top_p", "top_k", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
          "stop_token_ids", "ignore_eos", "keep_alive", "user", "best_of", "response_format", "echo", "logprobs",
          "tools", "tool_choice", "suffix"]
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "bot", 3]),
                                 "content": json_value | st.text(max_size=10)})
body = st.fixed_dictionaries({"model": st.sampled_from(["m", "", 3, None]) | json_value},
                             optional={**{k: json_value for k in FIELDS if k != "model"},
                                       "messages": st.lists(message, max_size=3) | json_value,
                                       "prompt": st.text(max_size=10) | st.lists(st.integers(-3, 2**40), max_size=4)
                                       | json_value})
