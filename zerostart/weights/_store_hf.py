"""``hf://org/name[@revision]``: a model on the Hugging Face Hub, read from the standard hub cache.

A snapshot already whole in the cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``) is used as it is,
without asking the network. Otherwise the files the model needs (weights, index, config,
tokenizer, chat templates: nothing else of the repository) are downloaded into that cache by
``huggingface_hub``, with its progress bars on stderr, honouring ``HF_ENDPOINT`` (another hub,
or a mirror), ``HF_TOKEN`` (gated and private repositories) and ``HF_HUB_OFFLINE`` (never ask).
An interrupted download resumes where it stopped; a file counts in the cache only once whole.
To pick up a newer commit of a branch that is already cached, ``zerostart pull hf://org/name``.

A file's identity is the name of its blob in the cache: the hub's content hash of its bytes.
"""

from __future__ import annotations

import os
import sys
import time

from zerostart.weights._checkpoint import resolve
from zerostart.weights._errors import SourceError, WeightsError
from zerostart.weights._store import MODEL_PATTERNS, ObjectInfo, digest
from zerostart.weights._store_local import LocalStore

_TRUE = ("1", "true", "yes", "on")


def hub_cache() -> str:
    """The hub cache directory, read from the environment now (not when huggingface_hub was imported)."""
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` says never to ask the hub (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def parse(spec: str) -> tuple[str, str | None]:
    """``hf://org/name[@revision]`` -> (``org/name``, revision or None)."""
    repo, _, rev = spec[len("hf://"):].rstrip("/").partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")) or (rev == "" and spec.endswith("@")):
        raise WeightsError(f"{spec}: expected hf://org/name[@revision]")
    return repo, rev or None


class HfStore:
    def __init__(self, spec: str, log=None) -> None:
        self.spec = spec
        self.repo, self.revision = parse(spec)
        self._dir: str | None = None
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def local_dir(self) -> str:
        """The snapshot directory, downloading what is missing."""
        if self._dir is None:
            self._dir = cached_snapshot(self.repo, self.revision) or self._download()
        return self._dir

    def cached(self) -> str | None:
        """The snapshot directory if it is whole in the cache; never touches the network."""
        return self._dir or cached_snapshot(self.repo, self.revision)

    def list(self) -> list[ObjectInfo]:
        local = LocalStore(self.local_dir())
        # the hub cache names each blob by its content hash: the identity of the file's bytes
        return [ObjectInfo(o.url, o.size, os.path.basename(os.path.realpath(o.url))) for o in local.list()]

    def stat(self, name: str) -> ObjectInfo:
        o = LocalStore(self.local_dir()).stat(name)
        return ObjectInfo(o.url, o.size, os.path.basename(os.path.realpath(o.url)))

    def read_range(self, obj: ObjectInfo, offset: int, buf: memoryview) -> None:
        LocalStore(self.local_dir()).read_range(obj, offset, buf)

    def identity(self) -> str:
        return digest(self.list(), os.path.basename(self.local_dir()))

    def close(self) -> None:
        pass

    def download(self) -> str:
        """Ask the hub for the revision now (even if a snapshot of it is cached) and download what
        is missing; returns the snapshot directory."""
        self._dir = self._download()
        return self._dir

    def _download(self) -> str:
        where = f"revision {self.revision!r} of {self.repo}" if self.revision else self.repo
        if offline():
            raise WeightsError(f"{self.spec}: {where} is not in the Hugging Face cache ({hub_cache()}) and "
                               "HF_HUB_OFFLINE is set; download it with the network on, or unset HF_HUB_OFFLINE")
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        self._log(f"zerostart: downloading {self.spec} from {endpoint} into {hub_cache()} (the model's files only)")
        t0 = time.perf_counter()
        try:
            path = _snapshot_download(self.repo, self.revision, endpoint)
        except SourceError:
            raise
        except Exception as e:  # noqa: BLE001 - translated below; huggingface_hub raises many kinds
            raise _translate(self.spec, where, endpoint, e) from None
        try:
            ck = resolve(path)
        except WeightsError as e:
            found = ", ".join(sorted(os.listdir(path))) or "nothing"
            raise WeightsError(f"{self.spec}: the repository has no safetensors weights zerostart can read ({e}); "
                               f"downloaded: {found}") from None
        gb = ck.nbytes / 1e9
        self._log(f"zerostart: {self.spec}: {gb:.2f} GB of weights in {path} ({time.perf_counter() - t0:.1f} s)")
        return path


def _snapshot_download(repo: str, revision: str | None, endpoint: str) -> str:
    try:
        # huggingface_hub (seconds to import) only when the hub is asked
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SourceError("hf:// downloads need huggingface_hub: pip install huggingface_hub") from None
    return snapshot_download(repo, revision=revision, cache_dir=hub_cache(), endpoint=endpoint,
                             token=os.environ.get("HF_TOKEN") or None, allow_patterns=list(MODEL_PATTERNS))


def _translate(spec: str, where: str, endpoint: str, e: Exception) -> Exception:
    """huggingface_hub's exception as a SourceError that says what to do."""
    # huggingface_hub (seconds to import) only when the hub is asked
    from huggingface_hub import errors

    msg = getattr(e, "server_message", None) or str(e).splitlines()[0]
    if isinstance(e, errors.GatedRepoError):
        return SourceError(f"{spec}: {where} is gated: request access on the Hub, then set HF_TOKEN to a token of an "
                           f"account that has it ({msg})")
    if isinstance(e, errors.RepositoryNotFoundError):
        return SourceError(f"{spec}: no repository {where} at {endpoint} (or it is private: set HF_TOKEN) ({msg})")
    if isinstance(e, errors.RevisionNotFoundError):
        return SourceError(f"{spec}: {where} does not exist at {endpoint} ({msg})")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return SourceError(f"{spec}: access denied (HTTP {status}) by {endpoint}; set HF_TOKEN to a token with access "
                           f"({msg})")
    return SourceError(f"{spec}: downloading {where} from {endpoint} failed ({type(e).__name__}: {msg}); nothing "
                       "incomplete was kept under the final names: run it again to resume")


def cached_snapshot(repo: str, revision: str | None) -> str | None:
    """The snapshot of ``revision`` (default ``main``) if it is in the cache with its weights
    whole (every shard its index names, and config.json); else None."""
    root = os.path.join(hub_cache(), "models--" + repo.replace("/", "--"))
    rev = revision or "main"
    commit = rev
    ref = os.path.join(root, "refs", rev)
    if os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
    snap = os.path.join(root, "snapshots", commit)
    if not os.path.isfile(os.path.join(snap, "config.json")):
        return None
    try:
        resolve(snap)
    except WeightsError:
        return None
    return snap


def open_store(spec: str) -> HfStore:
    return HfStore(spec)


def hf_gguf(spec: str, name: str | None = None) -> str:
    """The local path of one ``.gguf`` file of ``hf://org/name[@revision]`` (``name``: its path
    in the repository; None: the repository's only .gguf file), from the hub cache or downloaded
    into it (only that file: a GGUF repository usually holds one file per quantization). Honours
    ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_TOKEN`` as :class:`HfStore` does."""
    repo, revision = parse(spec)
    try:
        import huggingface_hub  # (seconds to import) only when the hub is asked
    except ImportError:
        raise SourceError("hf:// downloads need huggingface_hub: pip install huggingface_hub") from None
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
    where = f"revision {revision!r} of {repo}" if revision else repo
    token = os.environ.get("HF_TOKEN") or None
    if name is None:
        if offline:
            raise WeightsError(f"{spec}: name its .gguf file (HF_HUB_OFFLINE is set, so the repository's files "
                               "cannot be listed)")
        try:
            files = huggingface_hub.HfApi(endpoint=endpoint).list_repo_files(repo, revision=revision, token=token)
        except Exception as e:  # noqa: BLE001 - translated; huggingface_hub raises many kinds
            raise _translate(spec, where, endpoint, e) from None
        ggufs = sorted(f for f in files if f.endswith(".gguf"))
        if len(ggufs) != 1:
            raise WeightsError(f"{spec}: the repository holds {len(ggufs)} .gguf files; name the one to serve"
                               + (f" (one of: {', '.join(ggufs)})" if ggufs else ""))
        name = ggufs[0]
    if not name.endswith(".gguf"):
        raise WeightsError(f"{spec}: {name!r} is not a .gguf file")
    try:
        return huggingface_hub.hf_hub_download(repo, name, revision=revision, cache_dir=hub_cache(), token=token,
                                               local_files_only=offline, endpoint=endpoint)
    except Exception as e:  # noqa: BLE001 - translated below
        from huggingface_hub import errors  # (imported above when the download was asked for)

        if isinstance(e, (errors.LocalEntryNotFoundError, errors.EntryNotFoundError)):
            raise WeightsError(f"{spec}: no file {name!r} in {where}"
                               + (f" in the Hugging Face cache ({hub_cache()}; HF_HUB_OFFLINE is set)" if offline
                                  else "")) from None
        raise _translate(spec, where, endpoint, e) from None
