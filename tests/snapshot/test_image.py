import json
import os
import threading

import pytest
import torch

from zerostart import snapshot, weights
from zerostart.snapshot import Fingerprint, ImageError, ImageIncompatible


def arena_tensors(layers=3, fused_adjacent=True):
    """Tensors as an engine holds them: views into one arena, q/k/v back to back (in order)
    within each layer, layers in lexicographic (not numeric) order as Hugging Face writers do."""
    g = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                  p + "self_attn.v_proj.weight", p + "mlp.down_proj.weight"]
    names += ["model.norm.weight", "lm_head.weight"]
    shapes = {n: ((64,) if "norm" in n else (48, 64) if "proj" in n else (100, 64)) for n in names}
    total = sum(torch.Size(s).numel() for s in shapes.values())
    arena = torch.randn(total + 1000, generator=g)
    out, off = {}, 0
    def key(n):
        layer = n.split(".")[2] if ".layers." in n else ""
        return (n.split(".layers.")[0], layer, names.index(n))

    for n in sorted(names, key=key):  # lexicographic layers: 10 before 2, as in real checkpoints
        k = torch.Size(shapes[n]).numel()
        out[n] = arena[off : off + k].view(shapes[n])
        off += k
    return out


def fp(model_dir, device="cpu", dtype="float32"):
    return snapshot.fingerprint(str(model_dir), device, dtype)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    (d / "tokenizer.json").write_text("{}")
    return d


def test_image_round_trip(tmp_path, model_dir):
    tensors = arena_tensors()
    out = snapshot.write_image(tensors, str(model_dir), str(tmp_path / "img"), fp(model_dir), source=str(model_dir))
    m = snapshot.check_compatible(out, fp(model_dir))
    assert m["weights"]["tensors"] == len(tensors)
    assert os.path.exists(os.path.join(out, "config.json")) and os.path.exists(os.path.join(out, "tokenizer.json"))
    arena = weights.load_arena(out)
    assert set(arena.tensors) == set(tensors), "pad tensors are never returned"
    for n, t in tensors.items():
        assert torch.equal(arena.tensors[n], t), n
    assert arena.stats.verified_bytes > 0, "images are checksummed and verified on load"


def test_image_is_in_layer_order_and_keeps_fused_groups_adjacent(tmp_path, model_dir):
    tensors = arena_tensors(layers=12)
    out = snapshot.write_image(tensors, str(model_dir), str(tmp_path / "img"), fp(model_dir))
    h = weights.read_header(os.path.join(out, "model.safetensors"))
    assert h.data_start % 4096 == 0
    order = [n for n in h.tensors if not n.startswith("__zerostart_pad__")]
    layers = [int(n.split(".")[2]) for n in order if ".layers." in n]
    assert layers == sorted(layers)
    assert order[0] == "model.embed_tokens.weight" and order[-1] == "lm_head.weight"
    for i in range(12):
        q, k, v = (h.tensors[f"model.layers.{i}.self_attn.{x}_proj.weight"] for x in "qkv")
        assert q.end == k.start and k.end == v.start, "q/k/v stay back to back"
    m = snapshot.read_manifest(out)
    starts = [s for s, _ in m["weights"]["spans"].values()]
    assert all(s % 4096 == 0 for s in starts)


def test_groups_apart_in_the_arena_are_back_to_back_in_the_image(tmp_path, model_dir):
    """An arena that could not fuse (a group split across mapped shards) still gives an image
    that fuses for free: each group's members back to back, in order."""
    t = arena_tensors(layers=2)
    t = {n: t[n] for n in ["model.layers.1.self_attn.v_proj.weight", "model.layers.1.input_layernorm.weight",
                           "model.layers.1.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight",
                           "model.layers.1.self_attn.q_proj.weight"]}
    out = snapshot.write_image(t, str(model_dir), str(tmp_path / "img"), fp(model_dir))
    h = weights.read_header(os.path.join(out, "model.safetensors"))
    q, k, v = (h.tensors[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    assert q.end == k.start and k.end == v.start
    arena = weights.load_arena(out)
    assert all(torch.equal(arena.tensors[n], x) for n, x in t.items())


def test_incompatible_fingerprint_is_refused(tmp_path, model_dir):
    out = snapshot.write_image(arena_tensors(), str(model_dir), str(tmp_path / "img"), fp(model_dir))
    with pytest.raises(ImageIncompatible, match="device_type: image 'cpu', wanted 'cuda'"):
        snapshot.check_compatible(out, fp(model_dir, device="cuda"))
    with pytest.raises(ImageIncompatible, match="dtype"):
        snapshot.check_compatible(out, fp(model_dir, dtype="bfloat16"))
    (model_dir / "config.json").write_text(json.dumps({"hidden_size": 65}))
    with pytest.raises(ImageIncompatible, match="config_sha256"):
        snapshot.check_compatible(out, fp(model_dir))


def test_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="not a ready image"):
        snapshot.read_manifest(str(tmp_path))
    (tmp_path / snapshot.MANIFEST).write_text("{")
    with pytest.raises(ImageError, match="unreadable manifest"):
        snapshot.read_manifest(str(tmp_path))


def test_corrupt_image_is_detected(tmp_path, model_dir):
    out = snapshot.write_image(arena_tensors(layers=40), str(model_dir), str(tmp_path / "img"), fp(model_dir))
    p = tmp_path / "img" / "model.safetensors"
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    p.write_bytes(bytes(blob))
    with pytest.raises(weights.WeightsError, match="fails its checksum"):
        weights.load(out)
    p.write_bytes(bytes(blob[: len(blob) - 100]))
    with pytest.raises(weights.WeightsError):
        weights.load(out)


def test_concurrent_writers_leave_one_whole_image(tmp_path, model_dir):
    tensors = arena_tensors(layers=20)
    target = str(tmp_path / "img")
    errors = []

    def write():
        try:
            snapshot.write_image(tensors, str(model_dir), target, fp(model_dir))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=write) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert [n for n in os.listdir(tmp_path) if n.startswith(".img")] == [], "no temporary directories left"
    got = weights.load(target)
    for n, t in tensors.items():
        assert torch.equal(got[n], t)


def test_out_that_is_something_else(tmp_path, model_dir):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("x")
    with pytest.raises(ImageError, match="exists and is not a ready image"):
        snapshot.write_image(arena_tensors(), str(model_dir), str(tmp_path / "taken"), fp(model_dir))


def test_image_store_key_depends_on_fingerprint(model_dir):
    a = snapshot.image_store(str(model_dir), fp(model_dir))
    b = snapshot.image_store(str(model_dir), fp(model_dir, dtype="bfloat16"))
    assert a != b and os.path.dirname(a) == os.path.dirname(b)


def test_fingerprint_fields(model_dir):
    f = fp(model_dir)
    assert isinstance(f, Fingerprint) and f.device_type == "cpu" and f.dtype == "float32" and len(f.config_sha256) == 64


# -- every file of an image is covered by its manifest ---------------------------------------------


@pytest.fixture
def full_image(tmp_path, model_dir):
    """An image of a source with every kind of file the engine reads: tokenizer and its config,
    generation config, a chat template file and a named one, and compile caches."""
    (model_dir / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1, "c": 2}}}))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "c"}))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    (model_dir / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (model_dir / "additional_chat_templates").mkdir()
    (model_dir / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    out = snapshot.write_image(arena_tensors(), str(model_dir), str(tmp_path / "img"), fp(model_dir),
                               compile_cache=b"kernels")
    return tmp_path / "img", out


def test_the_manifest_covers_every_file_of_the_image(full_image):
    img, out = full_image
    m = snapshot.read_manifest(out)
    on_disk = {str(p.relative_to(img)) for p in img.rglob("*") if p.is_file()} - {snapshot.MANIFEST}
    assert set(m["files"]) == on_disk
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
            "additional_chat_templates/tool_use.jinja", "compile_cache.bin", "config.json",
            "zerostart-checksums.json", "model.safetensors"} <= on_disk
    assert m["files"]["model.safetensors"]["hashed_bytes"] == m["weights"]["data_start"]  # the header; blocks: checksums


def _swap_two_ids(path) -> None:
    doc = json.loads(path.read_text())
    vocab = doc["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("name, change", [
    ("tokenizer.json", _swap_two_ids),  # same size, two ids swapped
    ("tokenizer_config.json", lambda p: p.write_text(p.read_text().replace('"c"', '"b"'))),
    ("generation_config.json", lambda p: p.write_text(p.read_text().replace("2", "7"))),  # a digit changed
    ("config.json", lambda p: p.write_text(p.read_text().replace("64", "65"))),
    ("chat_template.jinja", lambda p: p.write_text(p.read_text().replace("content", "CONTENT"))),
    ("additional_chat_templates/tool_use.jinja", lambda p: p.write_text("{{ TOOLS }}")),
    ("compile_cache.bin", lambda p: p.write_bytes(b"kernelz")),
    ("zerostart-checksums.json", lambda p: p.write_text(p.read_text().replace('"size"', '"SIZE"'))),
])  # each the same size as before: only the checksum tells
def test_a_changed_file_is_refused_naming_it(full_image, name, change):
    img, out = full_image
    change(img / name)
    with pytest.raises(ImageError, match=f"{name} fails its checksum") as e:
        snapshot.read_manifest(out)
    assert not isinstance(e.value, ImageIncompatible)  # corrupt, not merely of another runtime
    with pytest.raises(ImageError, match=name):
        snapshot.check_compatible(out, fp(img.parent / "src"))


def test_a_changed_weights_header_and_missing_or_added_files_are_refused(full_image):
    img, out = full_image
    blob = img / "model.safetensors"
    whole = blob.read_bytes()
    header = bytearray(whole)
    header[20] = ord("X") if header[20] != ord("X") else ord("Y")  # inside the header: names, dtypes, offsets
    blob.write_bytes(bytes(header))
    with pytest.raises(ImageError, match="model.safetensors fails its checksum .its header changed"):
        snapshot.read_manifest(out)
    blob.write_bytes(whole[:-4096])
    with pytest.raises(ImageError, match=r"model.safetensors is \d+ bytes where its manifest says \d+ \(truncated"):
        snapshot.read_manifest(out)
    blob.write_bytes(whole)
    snapshot.read_manifest(out)

    (img / "special_tokens_map.json").write_text("{}")  # a file the loader would read, not written with the image
    with pytest.raises(ImageError, match="special_tokens_map.json not part of the image"):
        snapshot.read_manifest(out)
    (img / "special_tokens_map.json").unlink()
    (img / "chat_template.jinja").unlink()
    with pytest.raises(ImageError, match="chat_template.jinja is missing"):
        snapshot.read_manifest(out)


def _edit_manifest(img, edit) -> None:
    path = img / snapshot.MANIFEST
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def test_an_edited_manifest_is_refused(full_image):
    img, out = full_image

    def one_more(m: dict) -> None:
        m["weights"]["spans"]["embed"][1] += 1  # a digit changed in the manifest itself

    _edit_manifest(img, one_more)
    with pytest.raises(ImageError, match="fails its own checksum"):
        snapshot.read_manifest(out)


def test_an_image_of_an_older_version_is_stale_not_trusted(full_image):
    """Written before the file table: nothing vouches for its tokenizer, configs or templates."""
    img, out = full_image

    def as_before(m: dict) -> None:
        del m["files"], m["manifest_xxh3_64"]

    _edit_manifest(img, as_before)
    with pytest.raises(ImageIncompatible, match="older zerostart.*write it again"):
        snapshot.read_manifest(out)
