"""The house rules (docs/design.md, "The house"), checked on the source: imports point down the
packages' order, nobody imports another package's private modules, no modules import each other
in a circle, the torch-free leaf stays a leaf, each concept of the leaf has one home, and each
package's public face is pinned. An import made by name (``importlib.import_module``,
``__import__``, a lazy face's or the command line's table of module names) counts like any
other; one whose name the source does not spell is an error."""

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
PACKAGES = {"weights", "engine", "snapshot", "policy", "sim", "serve", "cluster", "bench", "plugins"}
# What each package may import of the others (besides the leaf): the order of docs/design.md.
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
    "cli": PACKAGES,  # above them all: each command's module by name (its table), when the command runs
    "__main__": {"cli"},
}
# The one module that imports by a name held in a variable: the lazy faces' helper, whose
# callers' tables of names are read instead.
BY_NAME_HELPERS = {"zerostart.serve._lazy"}


def _modules() -> list[tuple[str, pathlib.Path, ast.Module]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path, ast.parse(path.read_text(), str(path))))
    return out


MODULES = _modules()
NAMES = {m for m, _, _ in MODULES}
PACKAGE_INITS = {m for m, p, _ in MODULES if p.name == "__init__.py"}


def _imports(module: str, tree: ast.Module) -> list[tuple[int, str]]:
    """(line, dotted name) of everything a module imports of zerostart, by name too (see
    :func:`_by_name`); ``from a import b`` counts as ``a.b`` (b may be a module)."""
    package = module if module in PACKAGE_INITS else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    found += _by_name(tree)[0]
    return [(line, name) for line, name in found if name.split(".")[0] == "zerostart"]


def _by_name(tree: ast.Module) -> tuple[list[tuple[int, str]], list[int]]:
    """Imports by name: ``(line, module)`` of each ``import_module``/``__import__`` of a name the
    source spells (an f-string's literal head: the modules it begins) and of each module named in a
    table of names (a dict whose values are, or begin with, ``zerostart.`` module names: the
    lazy faces, the command line); and the lines of by-name imports of any other name."""
    found, unread = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (getattr(node.func, "attr", None) == "import_module"
                                           or getattr(node.func, "id", None) in ("import_module", "__import__")):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                head = str(arg.values[0].value)  # "pkg." names one of pkg's modules; "pkg._x_" those it begins
                named = [head[:-1]] if head.endswith(".") else sorted(m for m in NAMES if m.startswith(head))
                found += [(node.lineno, m) for m in named or [head.rsplit(".", 1)[0]]]
            else:
                unread.append(node.lineno)
        elif isinstance(node, ast.Dict):
            for v in node.values:
                v = v.elts[0] if isinstance(v, ast.Tuple) and v.elts else v
                if isinstance(v, ast.Constant) and isinstance(v.value, str) and v.value.startswith("zerostart."):
                    found.append((v.lineno, v.value))
    return found, unread


def _module_of(name: str) -> str:
    """The module a dotted import name lands in (``a.b.X``: module ``a.b``)."""
    while name not in NAMES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_by_name_imports_are_seen() -> None:
    tree = ast.parse("import importlib\nimportlib.import_module('zerostart.cluster')\n"
                     "__import__('zerostart.sim')\nm = importlib.import_module(f'zerostart.engine.{x}')\n"
                     "TABLE = {'a': ('zerostart.bench.load', 'help'), 'b': 'zerostart.policy._ttl'}\n"
                     "importlib.import_module(name)\n")
    assert sorted(_imports("zerostart.serve._x", tree)) == [
        (2, "zerostart.cluster"), (3, "zerostart.sim"), (4, "zerostart.engine"), (5, "zerostart.bench.load"),
        (5, "zerostart.policy._ttl")]
    assert _by_name(tree)[1] == [6]


def test_every_by_name_import_is_read() -> None:
    """An import whose name is neither spelled out nor in a table of names would hide an edge."""
    unread = {m: lines for m, _, tree in MODULES if (lines := _by_name(tree)[1])
              and m not in BY_NAME_HELPERS and not any(n.startswith("zerostart.") for _, n in _by_name(tree)[0])}
    assert unread == {}


def test_the_command_table_names_commands() -> None:
    """The command line imports each command's module by name (often a package's private ``_cli``):
    each exists and has the command's two functions."""
    cli = next(tree for m, _, tree in MODULES if m == "zerostart.cli")
    named = {n for _, n in _by_name(cli)[0]}
    assert named and named <= NAMES
    for name in named:
        tree = next(t for m, _, t in MODULES if m == name)
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "main" in defined and ("add_arguments" in defined or name.endswith("cluster._cli")), name


def test_no_private_imports_across_packages() -> None:
    """A private module (``_x``) is imported only from inside the package that holds it: others
    use that package's public face (its ``__init__``), whose names are pinned below. (The
    command line's table of commands excepted: above.)"""
    offenders = []
    for module, path, tree in MODULES:
        if module == "zerostart.cli":
            continue
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


def test_an_import_inside_a_function_says_why() -> None:
    """An import stays inside a function only to keep something heavy or optional out of a process
    or command that does not need it (torch out of the gateway, the gateway out of ``--help``), or
    because its time is measured; a comment on it, or just above its group, says which."""
    silent = []
    for _, path, tree in MODULES:
        lines = path.read_text().split("\n")
        seen: set[int] = set()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                for field in ("body", "orelse", "finalbody"):
                    stmts = getattr(node, field, None)
                    if not isinstance(stmts, list) or id(stmts) in seen:
                        continue
                    seen.add(id(stmts))
                    for group in _runs_of_imports(stmts):
                        first, last = group[0].lineno, group[-1].end_lineno or group[-1].lineno
                        said = lines[first - 2].strip().startswith("#") or any(
                            "#" in lines[i] for i in range(first - 1, last))
                        if not said:
                            silent.append(f"{path.relative_to(PACKAGE.parent)}:{first}")
    assert silent == []


def _runs_of_imports(stmts: list[ast.stmt]) -> list[list[ast.stmt]]:
    runs: list[list[ast.stmt]] = []
    for prev, stmt in zip([None, *stmts], stmts):
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            if isinstance(prev, (ast.Import, ast.ImportFrom)):
                runs[-1].append(stmt)
            else:
                runs.append([stmt])
    return runs


def test_no_modules_import_each_other_in_a_circle() -> None:
    """Between modules, whenever and however they import (in a function, by name, for type
    checking): a package's ``__init__`` handing on its modules' names is an edge; a module's own
    package being imported first is not."""
    edges = {m: {_module_of(n) for _, n in _imports(m, tree)} - {m} for m, _, tree in MODULES}
    assert _circles(edges) == []


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = []
                while True:
                    top = stack.pop()
                    on.discard(top)
                    scc.append(top)
                    if top == node:
                        break
                if len(scc) > 1:
                    out.append(sorted(scc))
    return out


def test_circles_are_found() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


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
    "zerostart/engine/_errors.py": {"EngineError"},
    "zerostart/weights/_errors.py": {"WeightsError", "ImageError", "ImageIncompatible", "SourceError", "ObjectChanged",
                                     "CacheFull"},
    "zerostart/serve/control.py": {"LoadSpec", "load_spec"},
    "zerostart/names.py": {"normalize_device", "device_type", "DEVICE_TYPES", "dtype_name", "default_dtype",
                           "cpu_has_bf16", "DTYPES",
                           "DTYPE_BYTES", "Dtype", "ImageMode", "IMAGE_MODES", "DEFAULT_IMAGE_MODE", "Scheme",
                           "source_scheme", "is_remote", "is_local", "Rung", "LADDER", "Climb"},
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
    "zerostart.names": ["Climb", "DEFAULT_IMAGE_MODE", "DEVICE_TYPES", "DTYPES", "DTYPE_BYTES", "IMAGE_MODES",
                        "KV_DTYPES", "LADDER", "QUANTIZE_MODES", "Dtype", "ImageMode", "KvDtype", "Quantize", "Rung", "Scheme", "cpu_has_bf16",
                        "default_dtype", "device_type", "dtype_name", "is_local", "is_remote", "normalize_device",
                        "source_scheme"],
    "zerostart.units": ["FOREVER", "GB", "HOURS_PER_MONTH", "format_duration", "format_size", "parse_duration",
                        "parse_size"],
    "zerostart.weights": ["Arena", "Cache", "Checkpoint", "Eviction", "Fingerprint", "GGUF_QUANTIZED", "GgufModel",
                          "GgufTensor", "Header", "ImageError", "ImageIncompatible", "LoadConfig", "LoadStats",
                          "MANIFEST", "ObjectChanged", "ObjectInfo", "QFormat", "QUANT_SUFFIXES", "Region",
                          "SourceError", "Store", "TensorInfo", "Transport", "WeightsError", "align_up", "arena_bytes", "cache_dir",
                          "cached_fraction", "check_compatible", "convert_gguf", "dequantize",
                          "drop_all_page_caches", "evict_page_cache", "fingerprint", "gguf_file", "gguf_held_nbytes", "hf_gguf",
                          "identity", "image_store", "is_gguf", "is_image", "is_remote", "load", "load_arena",
                          "local_copy", "localize", "map_anonymous_at", "map_shared_at", "open_direct", "open_gguf",
                          "open_source", "open_store", "own_pages", "parse_header", "pread_into", "pull", "qformat", "quantize",
                          "quantize_arena", "quantized_bits", "quantized_nbytes", "read_header", "read_manifest", "release_host", "release_pages",
                          "reserve_host", "reserved_host", "reset_credentials", "resolve", "save_file",
                          "touch_pages", "unreachable", "write_image"],
    "zerostart.engine": ["Constraint", "Engine", "EngineConfig", "EngineError", "PoolingParams", "RequestHandle",
                         "SamplingParams", "TOOL_PARSERS", "TokenEvent", "TokenLogprob", "TokenText", "Tokenizer",
                         "ToolCall", "ToolParser", "available_cpus", "cpu_kernels", "device_for", "quant_kernels",
                         "render_chat", "tool_parser", "weights_dtype"],
    "zerostart.engine._kernels": ["DECODE_ROWS", "MV_ROWS", "cpu_kernels", "decode_stack", "fused", "kernel", "linear",
                                  "matrix", "ops", "prepare", "quant_kernels", "rows", "tile_matrices"],
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
    "zerostart.serve.worker": ["Holder", "build_app", "main"],
    "zerostart.serve.backends": ["BACKENDS", "ColdStart", "CommandWorker", "ForeignWorker", "LlamacppWorker",
                                 "LogPhases", "Memory", "SglangWorker", "UpstreamError", "UpstreamPool", "UpstreamResponse", "VllmWorker",
                                 "WorkerBackend", "WorkerError", "ZerostartWorker", "backend_class",
                                 "device_total_bytes", "find_llama_server", "host_bytes_of_tree"],
    "zerostart.plugins": [],
    "zerostart.plugins.vllm": ["LOAD_FORMAT", "LoaderOptions", "register"],
    "zerostart.serve.control": ["ErrorBody", "ErrorDetail", "ITL_BUCKETS", "ImageReport", "InFlight", "KVCapacity", "LoadAccepted",
                                "LoadRecord", "LoadSpec", "ParkResult", "PhasesReport", "ReadyReport", "Refusal",
                                "RequestStats", "SETTLED", "STATS_HEADER", "TOKEN_ENV", "WORKER_TRANSITIONS",
                                "WakeResult", "WorkerState", "check_worker", "load_spec"],
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
