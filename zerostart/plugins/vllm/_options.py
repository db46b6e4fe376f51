"""The loader's options, as given in vLLM's ``--model-loader-extra-config`` (JSON).

No vLLM or torch import here: the gateway's ``vllm`` backend builds these options too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LOAD_FORMAT = "zerostart"  # vLLM's --load-format value that selects this loader


class LoaderOptions(BaseModel):
    """``--model-loader-extra-config`` keys of ``--load-format zerostart`` (all optional)."""

    model_config = ConfigDict(extra="forbid")

    # where the weights are, when not in vLLM's --model directory: a path, hf://org/name[@rev],
    # s3://bucket/prefix or https://host/path (--model then holds only config and tokenizer)
    source: str | None = None
    threads: int = Field(0, ge=0)  # reader threads; 0: zerostart's choice per device and cache state
    direct_io: Literal["auto", "always", "never"] = "auto"  # O_DIRECT for files not in the page cache
    mmap: Literal["auto", "always", "never"] = "auto"  # map page-cache pages as the arena (CPU, no cast)
    verify: Literal["auto", "never"] = "auto"  # check zerostart-checksums.json where the checkpoint has one
    cache: bool = True  # remote sources: also write the bytes to zerostart's local cache
