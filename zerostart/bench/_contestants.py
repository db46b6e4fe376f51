"""The loaders ``bench load`` races, each with its fastest documented settings.

Every contestant ends with every byte resident in the target device's memory: the trial
touches one byte per page of each CPU tensor afterwards (a lazy mapping pays its page faults
inside the timed region) and synchronizes CUDA before the clock stops.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

from zerostart import weights

Loader = Callable[[str, list[str], str, dict[str, Any]], Any]

CONTESTANTS = ["zerostart", "zerostart-reserved", "safetensors", "safe_open", "runai", "fastsafetensors", "tensorizer"]
LABELS = {
    "zerostart": "zerostart",
    "zerostart-reserved": "zerostart (reserved ahead)",
    "safetensors": "safetensors load_file",
    "safe_open": "safetensors safe_open",
    "runai": "Run:ai Model Streamer",
    "fastsafetensors": "fastsafetensors (no GDS)",
    "tensorizer": "Tensorizer",
    "zerostart-nocache": "zerostart (stream only)",
    "download": "download, then load",
}


def available(name: str, device: str = "cpu") -> str | None:
    """None if the contestant can run here, else why not."""
    if name == "zerostart-reserved" and not device.startswith("cpu"):
        return "a host memory reserve serves CPU arenas only"
    modules = {"zerostart": "zerostart.weights", "zerostart-reserved": "zerostart.weights",
               "safetensors": "safetensors", "safe_open": "safetensors",
               "runai": "runai_model_streamer", "fastsafetensors": "fastsafetensors", "tensorizer": "tensorizer",
               "zerostart-nocache": "zerostart.weights", "download": "boto3"}

    if importlib.util.find_spec(modules[name]) is None:
        return f"{modules[name]} is not installed (pip install 'zerostart[bench]')"
    return None


def prepare(name: str, path: str, files: list[str], work_dir: str) -> dict[str, Any]:
    """Untimed setup a contestant needs once (Tensorizer reads its own format)."""
    if name != "tensorizer":
        return {}
    out = os.path.join(work_dir, "model.tensors")
    if not os.path.exists(out):
        # a peer's library (optional): only when that peer is measured
        from safetensors.torch import load_file
        from tensorizer import TensorSerializer

        tmp = out + ".tmp"
        s = TensorSerializer(tmp)
        for f in files:
            s.write_state_dict(load_file(f))
        s.close()
        os.replace(tmp, out)
    return {"tensorizer_file": out}


def load(name: str, path: str, files: list[str], device: str, extra: dict[str, Any], threads: int) -> tuple[dict, Any]:
    """Run one contestant; returns (name -> tensor, objects to keep alive until measured)."""
    return _LOADERS[name](path, files, device, extra, threads)


def _zerostart(path, files, device, extra, threads):
    cfg = weights.LoadConfig(**extra["config"]) if extra.get("config") else None
    arena = weights.load_arena(path, device, config=cfg)
    return arena.tensors, arena


def _zerostart_nocache(path, files, device, extra, threads):
    arena = weights.load_arena(path, device, config=weights.LoadConfig(cache=False))
    return arena.tensors, arena


def _download(path, files, device, extra, threads):
    """boto3's managed download of every object to local disk, then safetensors."""
    # a peer's library (optional): only when that peer is measured
    import boto3
    from boto3.s3.transfer import TransferConfig
    from safetensors.torch import load_file

    s3 = boto3.client("s3")
    cfg = TransferConfig(max_concurrency=threads, multipart_chunksize=16 << 20)
    out = {}
    for url in files:
        bucket, _, key = url[len("s3://"):].partition("/")
        local = os.path.join(extra["download_dir"], os.path.basename(key))
        s3.download_file(bucket, key, local, Config=cfg)
        out.update(load_file(local, device=device))
    return out, None


def _safetensors(path, files, device, extra, threads):
    # a peer's library (optional): only when that peer is measured
    from safetensors.torch import load_file

    out = {}
    for f in files:
        out.update(load_file(f, device=device))
    return out, None


def _safe_open(path, files, device, extra, threads):
    # a peer's library (optional): only when that peer is measured
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(f, framework="pt", device=device) as g:
            for k in g.keys():
                out[k] = g.get_tensor(k)
    return out, None


def _runai(path, files, device, extra, threads):
    # Documented knobs: RUNAI_STREAMER_CONCURRENCY (reader threads), RUNAI_STREAMER_MEMORY_LIMIT
    # (-1 = unlimited CPU buffer); set by the trial before import.
    from runai_model_streamer import SafetensorsStreamer

    out = {}
    with SafetensorsStreamer() as s:
        s.stream_files(files, device="cpu")
        for name, t in s.get_tensors():
            out[name] = t.to(device) if device != "cpu" else t
    return out, None


def _fastsafetensors(path, files, device, extra, threads):
    # a peer's library (optional): only when that peer is measured
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    if device == "cuda":
        device = "cuda:0"  # it wants an explicit index
    loader = SafeTensorsFileLoader(SingleGroup(), device, nogds=True, max_threads=max(16, threads))
    loader.add_filenames({0: files})
    fb = loader.copy_files_to_device()
    out = {k: fb.get_tensor(k) for k in loader.get_keys()}
    return out, (loader, fb)


def _tensorizer(path, files, device, extra, threads):
    # a peer's library (optional): only when that peer is measured
    from tensorizer import TensorDeserializer

    d = TensorDeserializer(extra["tensorizer_file"], device=device, num_readers=max(4, threads), lazy_load=False)
    return dict(d), d


_LOADERS: dict[str, Callable] = {
    "zerostart": _zerostart,
    "zerostart-reserved": _zerostart,  # the trial reserves the host memory before the clock starts
    "safetensors": _safetensors,
    "safe_open": _safe_open,
    "runai": _runai,
    "fastsafetensors": _fastsafetensors,
    "tensorizer": _tensorizer,
    "zerostart-nocache": _zerostart_nocache,
    "download": _download,
}
