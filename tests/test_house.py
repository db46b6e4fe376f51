"""The house rules (DESIGN.md §3), checked on the source: imports point down the packages'
order, nobody imports another package's private modules, the torch-free leaf stays a leaf,
each concept of the leaf has one home, and each package's public face is pinned."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

import zerostart

from tests.serve._helpers import child_env

PACKAGE = pathlib.Path(zerostart.__file__).parent
LEAF = {"names", "units", "telemetry"}  # torch-free, import nothing of zerostart: anyone may use them
# What each package may import of the others (besides the leaf): the order of DESIGN.md §3.
BELOW = {
    "weights": set(),
    "engine": {"weights"},
    "snapshot": {"weights", "engine"},
    "policy": set(),
    "sim": {"policy"},
    "serve": {"weights", "engine", "snapshot", "policy"},
    "cluster": {"weights", "engine", "snapshot", "serve", "policy"},  # the fleet on Ray Serve
    "bench": {"weights", "engine", "snapshot", "serve", "cluster", "policy", "sim"},  # top floor: nothing imports it
    "plugins": {"weights"},  # zerostart inside other engines: loaded by them (entry points), imported by nobody
    "cli": set(),  # commands are imported by name (importlib), when they run
    "__main__": {"cli"},
}


def _modules() -> list[tuple[str, pathlib.Path, ast.Module]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path, ast.parse(path.read_text(), str(path))))
    return out


MODULES = _modules()


def _imports(module: str, tree: ast.Module) -> list[tuple[int, str]]:
    """(line, dotted name) of everything a module imports of zerostart; ``from a import b``
    counts as ``a.b`` (b may be a module)."""
    package = module if any(p.name == "__init__.py" and m == module for m, p, _ in MODULES) else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "zerostart"]


def test_no_private_imports_across_packages() -> None:
    """A private module (``_x``) is imported only from inside the package that holds it: others
    use that package's public face (its ``__init__``), whose names are pinned below."""
    offenders = []
    for module, path, tree in MODULES:
        for line, name in _imports(module, tree):
            parts = name.split(".")
            for i, part in enumerate(parts[1:], start=1):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])  # the package that holds the private module
                    if module != owner and not module.startswith(owner + "."):
                        offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
                    break
    assert offenders == []


def test_imports_point_down() -> None:
    offenders = []
    for module, path, tree in MODULES:
        parts = module.split(".")
        if len(parts) == 1:
            continue  # zerostart/__init__.py
        me = parts[1]
        allowed = LEAF | {me} | BELOW.get(me, set()) | {"__version__"}
        for line, name in _imports(module, tree):
            top = name.split(".")[1] if "." in name else "__version__"  # `import zerostart`: its root
            if top not in allowed:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({me}) imports {name}")
    assert offenders == []


def test_the_leaf_imports_nothing_of_zerostart_and_nothing_heavy() -> None:
    for module, _, tree in MODULES:
        if module.split(".")[-1] in LEAF:
            assert _imports(module, tree) == [], module
    code = ("import sys, zerostart.names, zerostart.units, zerostart.telemetry\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'pydantic', 'yaml')))")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# Each concept of the leaf is defined there and nowhere else (a second definition is how the
# config came to accept a device the loaders reject).
ONE_HOME = {
    "zerostart/names.py": {"normalize_device", "device_type", "DEVICE_TYPES", "dtype_name", "default_dtype",
                           "cpu_has_bf16", "DTYPES",
                           "DTYPE_BYTES", "Dtype", "ImageMode", "IMAGE_MODES", "DEFAULT_IMAGE_MODE", "Scheme",
                           "source_scheme", "is_remote", "is_local"},
    "zerostart/units.py": {"parse_size", "parse_duration", "format_size", "format_duration", "FOREVER", "GB",
                           "HOURS_PER_MONTH"},
}


def test_each_leaf_concept_has_one_home() -> None:
    homes = {name: home for home, names in ONE_HOME.items() for name in names}
    found: dict[str, list[str]] = {}
    for _, path, tree in MODULES:
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in names:
                if name in homes:
                    found.setdefault(name, []).append(str(path.relative_to(PACKAGE.parent)))
    assert found == {name: [home] for name, home in homes.items()}


FACES = {
    "zerostart.names": ["DEFAULT_IMAGE_MODE", "DEVICE_TYPES", "DTYPES", "DTYPE_BYTES", "IMAGE_MODES", "Dtype",
                        "ImageMode", "Scheme", "cpu_has_bf16", "default_dtype", "device_type", "dtype_name", "is_local",
                        "is_remote", "normalize_device", "source_scheme"],
    "zerostart.units": ["FOREVER", "GB", "HOURS_PER_MONTH", "format_duration", "format_size", "parse_duration",
                        "parse_size"],
    "zerostart.weights": ["Arena", "Cache", "Checkpoint", "Eviction", "Fingerprint", "GgufModel", "GgufTensor",
                          "Header", "ImageError", "ImageIncompatible", "LoadConfig", "LoadStats", "MANIFEST",
                          "ObjectChanged", "ObjectInfo", "Region", "SourceError", "Store", "TensorInfo", "Transport",
                          "WeightsError", "align_up", "arena_bytes", "cache_dir", "check_compatible", "convert_gguf",
                          "cached_fraction", "drop_all_page_caches", "evict_page_cache", "fingerprint", "gguf_file",
                          "hf_gguf", "identity",
                          "image_store", "is_gguf", "is_image", "is_remote", "load", "load_arena", "local_copy",
                          "localize", "map_anonymous_at", "map_shared_at", "open_direct", "open_gguf", "open_source",
                          "open_store", "parse_header", "pread_into", "pull", "read_header", "read_manifest",
                          "release_host", "release_pages", "reserve_host", "reserved_host", "reset_credentials",
                          "resolve", "save_file", "touch_pages", "unreachable", "write_image"],
    "zerostart.engine": ["Constraint", "Engine", "EngineConfig", "EngineError", "PoolingParams", "RequestHandle",
                         "SamplingParams", "TOOL_PARSERS", "TokenEvent", "TokenLogprob", "TokenText", "Tokenizer",
                         "ToolCall", "ToolParser", "available_cpus", "device_for", "render_chat", "tool_parser",
                         "weights_dtype"],
    "zerostart.snapshot": ["CheckpointUnavailable", "EngineParking", "Fingerprint", "ImageError", "ImageIncompatible",
                           "MANIFEST", "ParkStats", "Parking", "VmmBuffer", "VmmUnavailable", "buffer_of",
                           "check_compatible", "fingerprint", "image_store", "is_image", "read_manifest",
                           "require_vmm", "resume", "state", "suspend", "vmm_allocator", "write_engine_image",
                           "write_image"],
    "zerostart.serve": ["ClusterConfig", "ConfigError", "DEMO_NAME", "DeviceConfig", "Fleet", "IngressConfig",
                        "ModelConfig", "PlacementConfig", "PoolConfig", "PrewarmWindow", "ServeConfig", "ServerConfig",
                        "State", "TRANSITIONS", "create_app", "ensure_demo_model", "load_config"],
    "zerostart.serve.edge": [
        "ABORT", "ANYONE", "Access", "ApiRoute", "App", "Auth", "BadRequest", "BodyTimeout", "BodyTooLarge", "Bounds",
        "COLD_START_HEADER", "ChatCompletionRequest", "ClosingStream", "CompletionRequest", "DefaultHeaders",
        "DetokenizeRequest", "EmbeddingRequest", "Forbidden", "FunctionCallItem", "FunctionCallOutputItem", "Gate",
        "GenerateRequest", "Guard", "Hold", "InputItem", "InternalError", "MessageItem", "NamedTool", "NotFound",
        "NotServed", "OpenAIBody", "PROXIED", "QueueFull", "ROUTES", "ROUTE_TABLE", "RequestBody", "RequestTimeout", "ResponseFormat", "ResponsesRequest", "SSE_HEADERS", "STATUS", "ServeError",
        "ShuttingDown", "StartFailed", "StartTimeout", "TENANT", "Tenant", "TokenizeRequest", "Unauthorized",
        "UnknownModel", "UnknownResponse", "WorkerFailed", "WorkerReplaced", "bounded_protocol", "error_response",
        "key_tenant", "model_card", "model_list", "not_found", "openai_paths", "parse_body", "parse_request",
        "pause_deadline", "paths", "replay", "resources", "restart_deadline", "tenant_of"],
    "zerostart.serve.gateway": ["Fleet", "Lease", "State", "TRANSITIONS", "create_app"],
    "zerostart.serve.worker": ["Holder", "LoadSpec", "build_app", "main"],
    "zerostart.serve.backends": ["BACKENDS", "ColdStart", "CommandWorker", "ForeignWorker", "LlamacppWorker",
                                 "LogPhases", "Memory", "SglangWorker", "UpstreamError", "UpstreamPool", "UpstreamResponse", "VllmWorker",
                                 "WorkerBackend", "WorkerError", "ZerostartWorker", "backend_class",
                                 "device_total_bytes", "find_llama_server", "host_bytes_of_tree"],
    "zerostart.plugins": [],
    "zerostart.plugins.vllm": ["LOAD_FORMAT", "LoaderOptions", "register"],
    "zerostart.serve.control": ["ErrorBody", "ErrorDetail", "ITL_BUCKETS", "ImageReport", "InFlight", "LoadAccepted",
                                "LoadRecord", "LoadRequest", "ParkResult", "PhasesReport", "ReadyReport", "Refusal",
                                "RequestStats", "SETTLED", "STATS_HEADER", "TOKEN_ENV", "WORKER_TRANSITIONS",
                                "WakeResult", "WorkerState", "check_worker"],
    "zerostart.policy": ["AlwaysWarm", "Candidate", "CostAwareLadder", "CostModel", "Decision", "FixedTTL",
                         "HybridHistogram", "LADDER", "ModelView", "POLICY_NAMES", "Policy", "PolicyError", "Rung",
                         "choose_victim", "describe", "make", "usable"],
    "zerostart.bench": ["pinned_h2d"],
    "zerostart.cluster": ["ReplicaPolicy", "app_from_args", "build", "deploy", "engine_options", "merge_metrics",
                          "pools", "replica_policy", "serve_forever"],
    "zerostart.sim": ["Capacity", "FORMATS", "Service", "Start", "Trace", "TraceError", "derive", "load_trace",
                      "parse_popularity", "replay"],
}


@pytest.mark.parametrize("module", sorted(FACES))
def test_public_faces_are_pinned(module: str) -> None:
    face = importlib.import_module(module)
    assert sorted(face.__all__) == sorted(FACES[module])
    for name in face.__all__:
        assert getattr(face, name) is not None, name


def test_every_package_has_a_pinned_face() -> None:
    packages = {m for m, p, _ in MODULES if p.name == "__init__.py" and m != "zerostart"}
    assert packages - set(FACES) == set()


def test_benchmark_scripts_use_public_faces() -> None:
    """The scripts in the repository's bench/ (the top floor, with zerostart.bench) import
    zerostart's public faces only."""
    offenders = []
    for path in sorted((PACKAGE.parent / "bench").glob("*.py")):
        for line, name in _imports("bench", ast.parse(path.read_text(), str(path))):
            if any(part.startswith("_") and not part.startswith("__") for part in name.split(".")):
                offenders.append(f"bench/{path.name}:{line} imports {name}")
    assert offenders == []
