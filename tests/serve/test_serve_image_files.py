"""Every file of a ready image is verified before it is served from, end to end: a tokenizer,
config or chat template changed in the image (two token ids swapped, a digit changed) is
reported, never served; the source answers (the same as before the change) and the image is
written again. (Only the weights were checksummed: such an image was served as rung ``image``
with wrong answers, and kept for every later start.)"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

import pytest

from tests.serve._helpers import Gateway

pytestmark = pytest.mark.slow  # eight cold starts, four of them writing the image

CHAT: dict[str, Any] = dict(messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=24, temperature=0,
                            extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def source(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny checkpoint with its chat template in a file of its own (as many models ship it)."""
    out = str(tmp_path_factory.mktemp("src") / "tampered")
    shutil.copytree(tiny_model, out)
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        template = json.load(f)["chat_template"]
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
        f.write(template)
    return out


@pytest.fixture(scope="module")
def gw(source: str, tmp_path_factory: pytest.TempPathFactory):
    g = Gateway({"models": [{"path": source, "name": "tampered", "idle_timeout": 0.5}]},  # images: write
                str(tmp_path_factory.mktemp("image-files")))
    yield g
    g.stop()


def _swap_ids_of(text: str, source: str) -> Callable[[str], None]:
    """Swap the ids of two tokens that ``text`` is made of, in a tokenizer.json."""
    from zerostart.engine import Tokenizer

    ids = list(dict.fromkeys(Tokenizer(source).encode(text, add_special_tokens=False)))
    assert len(ids) >= 2, text

    def change(path: str) -> None:
        with open(path) as f:
            doc = json.load(f)
        vocab = doc["model"]["vocab"]
        a, b = (next(t for t, i in vocab.items() if i == want) for want in ids[:2])
        vocab[a], vocab[b] = vocab[b], vocab[a]
        with open(path, "w") as f:
            json.dump(doc, f, ensure_ascii=False)

    return change


def _replace(old: str, new: str) -> Callable[[str], None]:
    def change(path: str) -> None:
        with open(path) as f:
            text = f.read()
        assert old in text, (path, old)
        with open(path, "w") as f:
            f.write(text.replace(old, new, 1))

    return change


def test_a_changed_tokenizer_config_or_template_in_an_image_is_never_served(gw: Gateway, source: str) -> None:
    client = gw.openai()

    def cold_start(rung: str) -> tuple[str, dict[str, Any]]:
        gw.wait_for("the model at zero", lambda: gw.model("tampered")["state"] == "zero", timeout=15)
        text = client.chat.completions.create(model="tampered", **CHAT).choices[0].message.content
        cold = gw.model("tampered")["last_cold_start"]
        assert cold["rung"] == rung, cold
        return text, cold

    expected, cold = cold_start("source")
    image = cold["image"]["path"]
    manifest = os.path.join(image, "zerostart-image.json")
    gw.wait_for("the ready image", lambda: os.path.isfile(manifest), timeout=20)
    assert cold_start("image")[0] == expected

    changes = [("tokenizer.json", _swap_ids_of(expected, source)),
               ("config.json", _replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-01')),  # a digit
               ("chat_template.jinja", _replace("'<|end_header_id|>", "'<|eot_id|>"))]
    for name, change in changes:
        with open(os.path.join(image, name), "rb") as f:
            whole = f.read()
        change(os.path.join(image, name))
        text, cold = cold_start("source")
        assert text == expected, name
        why = cold["image"]["rejected"]
        assert why is not None and name in why, (name, cold["image"])
        assert any(p["name"] == "rejected_image" and name in p["detail"]["reason"] for p in cold["phases"]), name
        assert name in gw.tail(200)  # the log says why

        def rewritten(name: str = name, whole: bytes = whole) -> bool:
            try:
                with open(os.path.join(image, name), "rb") as f:
                    return os.path.isfile(manifest) and f.read() == whole
            except FileNotFoundError:
                return False

        gw.wait_for(f"the image written again (after {name})", rewritten, timeout=20)
        assert cold_start("image")[0] == expected, name
