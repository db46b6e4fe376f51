"""Tokenizer (``tokenizer.json`` via the ``tokenizers`` library) and chat templates (jinja2).

Chat templates render as Hugging Face transformers renders them: a sandboxed environment with
``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension, a ``tojson`` that does not
escape HTML, ``raise_exception``, ``strftime_now``, the special tokens as variables, and message
keys whose value is None dropped. ``tokenize=True`` encodes the rendered text without adding
special tokens (the template writes them).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from zerostart.engine._config import read_json_object
from zerostart.engine._errors import EngineError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


class Tokenizer:
    """Encode, decode and render chat templates for one model directory."""

    def __init__(self, model_dir: str) -> None:
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise EngineError(f"{model_dir}: no tokenizer.json here (only tokenizer.json tokenizers are supported)")
        try:
            self._tk = _HFTokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises plain Exception on bad files
            raise EngineError(f"{path}: cannot be read by the tokenizers library ({e})") from None
        config: dict[str, Any] = {}
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(config_path):
            config = read_json_object(config_path)
        self.config = config
        # named special tokens (plus model-specific *_token keys), as the template sees them
        self.special_tokens: dict[str, str] = {}
        for key, value in config.items():
            text = _token_text(value)
            if text is not None and (key in SPECIAL_TOKEN_KEYS or key.endswith("_token")):
                self.special_tokens[key] = text
        self.chat_templates = self._read_templates(model_dir, config)
        # the same ids as encode(); without offsets where the library can skip them
        self._encode_batch = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
        vocab = self._tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.special_ids = frozenset(i for i, t in self._tk.get_added_tokens_decoder().items() if t.special)
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        self.eos_token_id = self.token_to_id(self.special_tokens.get("eos_token"))

    @staticmethod
    def _read_templates(model_dir: str, config: dict[str, Any]) -> dict[str, str]:
        templates: dict[str, str] = {}
        raw = config.get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            for item in raw:
                if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str):
                    templates[item["name"]] = item["template"]
        # separate template files take priority over tokenizer_config.json
        jinja = os.path.join(model_dir, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                templates["default"] = f.read()
        extra = os.path.join(model_dir, "additional_chat_templates")
        if os.path.isdir(extra):
            for name in sorted(os.listdir(extra)):
                if name.endswith(".jinja"):
                    with open(os.path.join(extra, name), encoding="utf-8") as f:
                        templates[name[: -len(".jinja")]] = f.read()
        return templates

    # -- tokens ---------------------------------------------------------------------------

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tk.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Encoded through the library's batch path, which lets go of
        the GIL while it works (its single-text ``encode`` holds it: a prompt of megabytes then
        stops every other thread, a server's event loop included, for seconds)."""
        if not isinstance(text, str):
            raise EngineError(f"encode() takes a str (got {type(text).__name__})")
        return self._encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of a token id (its raw form, e.g. ``Ġthe``), None if there is none."""
        return self._tk.id_to_token(token_id)

    def to_str(self) -> str:
        """The tokenizer as ``tokenizer.json`` text (what grammar engines read)."""
        return self._tk.to_str()

    # -- chat -----------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        if chat_template is not None and chat_template in self.chat_templates:
            return self.chat_templates[chat_template]
        if chat_template is not None:
            return chat_template
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if self.chat_templates:
            raise EngineError(f"the model has several chat templates and none is the default; "
                              f"name one of {sorted(self.chat_templates)}")
        raise EngineError("the model has no chat template (tokenizer_config.json 'chat_template' "
                          "or chat_template.jinja); send a plain prompt instead")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, *, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, continue_final_message: bool = False,
                            chat_template: str | None = None, **kwargs: Any) -> str | list[int]:
        """Render ``messages`` with the model's chat template (text, or token ids with ``tokenize``)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise EngineError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        if continue_final_message and add_generation_prompt:
            raise EngineError("continue_final_message and add_generation_prompt cannot both be set")
        source = self.get_chat_template(chat_template, tools)
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise EngineError(f"messages[{i}] must be an object (got {type(m).__name__})")
            chat.append({k: _plain(v) for k, v in m.items() if v is not None})
        final = None
        if continue_final_message:
            final = chat[-1].get("content")
            if not isinstance(final, str):
                raise EngineError("continue_final_message needs a final message with string content")
            chat[-1]["content"] = final + _CONTINUE_TAG
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            text = _compile(source).render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                           add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise EngineError(f"chat template: {e}") from None
        if final is not None:
            tag = text.rfind(_CONTINUE_TAG.strip())
            if tag < 0 or final.strip() not in text:
                raise EngineError("continue_final_message: the template dropped the final message")
            text = text[:tag] if text[tag : tag + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:tag].rstrip()
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types, so the sandbox sees no foreign objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=16)
def _compile(source: str):
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class _Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class _Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class _Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise EngineError(f"chat template has a syntax error on line {e.lineno}: {e.message}") from None
