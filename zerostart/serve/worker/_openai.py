"""The OpenAI routes of a worker, over a loaded :class:`zerostart.engine.Engine`.

Chat and text completions, streamed (SSE) and not, with ``n`` choices and several prompts per
request; ``usage`` counts each prompt once and every choice's tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from zerostart import __version__
from zerostart.serve._errors import BadRequest, ServeError
from zerostart.engine import TokenText
from zerostart.serve._http import ClosingStream
from zerostart.serve._openai_schema import ChatCompletionRequest, CompletionRequest, _Request, parse_body
from zerostart.serve.worker._logprobs import CompletionLogprobs, chat_entry, chat_logprobs

if TYPE_CHECKING:
    from zerostart.engine import Engine

_FINGERPRINT = f"zerostart-{__version__}"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


class _Choice:
    """One sequence being generated: which prompt it continues and what it has produced."""

    def __init__(self, index: int, prompt: int, handle: Any) -> None:
        self.index = index
        self.prompt = prompt  # index into the request's prompts
        self.handle = handle
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ids: list[int] = []  # the prompt's token ids
        self.logprobs: list[Any] = []  # TokenLogprob per generated token (when asked for)
        self.prompt_logprobs: list[Any] | None = None
        self.sent: CompletionLogprobs | None = None  # a completion stream's logprobs so far

    def take(self, ev: Any) -> None:
        self.text.append(ev.text)
        if ev.logprob is not None:
            self.logprobs.append(ev.logprob)
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        self.prompt_tokens = ev.prompt_tokens
        self.completion_tokens = ev.completion_tokens
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason


class OpenAIRoutes:
    def __init__(self, engine: Engine, name: str) -> None:
        from zerostart.engine import SamplingParams

        self.engine = engine
        self.name = name
        self._SamplingParams = SamplingParams
        self._text_of = TokenText(engine.tokenizer)

    # -- routes -----------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        card = {"id": self.name, "object": "model", "created": int(time.time()), "owned_by": "zerostart",
                "max_model_len": self.engine.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    # Parsing a large body, chat templates and tokenization run on a thread: the event loop
    # keeps serving the other requests (and streaming their tokens) meanwhile.

    async def chat(self, request: Request) -> Response:
        try:
            req = await parse_body(ChatCompletionRequest, await request.body())
            assert isinstance(req, ChatCompletionRequest)
            prompt = await asyncio.to_thread(self._chat_prompt, req)
            choices = self._submit(req, [prompt], req.max_new_tokens, param="messages")
        except ServeError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return await self._respond("chat", req, choices, None)

    async def completions(self, request: Request) -> Response:
        try:
            req = await parse_body(CompletionRequest, await request.body())
            assert isinstance(req, CompletionRequest)
            given = req.prompts()
            prompts = await asyncio.to_thread(lambda: [self._encode(p) for p in given])
            choices = self._submit(req, prompts, req.max_new_tokens, param="prompt")
        except ServeError as e:
            return JSONResponse(e.body(), status_code=e.status)
        try:
            # echo gives back the prompt as it was sent (token prompts as their text)
            echo = await asyncio.to_thread(
                lambda: [p if isinstance(p, str) else self.engine.tokenizer.decode(p) for p in given]) if req.echo else None
        except BaseException:
            _cancel(choices)
            raise
        return await self._respond("text", req, choices, echo)

    # -- prompts and sampling ---------------------------------------------------------------

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.engine.tokenizer
        try:
            out = tok.apply_chat_template(req.template_messages(), add_generation_prompt=True, tokenize=True)
        except (ValueError, KeyError, TypeError) as e:
            raise BadRequest(f"model {self.name!r} could not format these messages with its chat template ({e}); "
                             "use /v1/completions with a plain prompt instead", param="messages") from None
        return list(out) if not isinstance(out, str) else list(tok.encode(out))

    def _encode(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else list(self.engine.tokenizer.encode(prompt))

    def _submit(self, req: _Request, prompts: list[list[int]], max_new: int | None, param: str) -> list[_Choice]:
        try:
            params = self._params(req, prompts, max_new, param)
        except ValueError as e:  # the engine's own checks of the sampling parameters
            raise BadRequest(str(e)) from None
        choices: list[_Choice] = []
        group = object()  # this request's sequences share the engine's slots fairly with other requests'
        try:
            for i, (ids, sp) in enumerate(params):
                choices.append(_Choice(i, i // req.n, self.engine.submit(ids, sp, group=group)))
                choices[-1].ids = ids
        except ValueError as e:  # the engine refuses what it cannot run (e.g. a token id past its vocabulary)
            _cancel(choices)
            raise BadRequest(str(e), param=param) from None
        return choices

    def _params(self, req: _Request, prompts: list[list[int]], max_new: int | None, param: str) -> list[tuple[list[int], Any]]:
        limit = self.engine.max_model_len
        params = []
        for ids in prompts:
            if not ids:
                raise BadRequest("the prompt is empty after tokenization", param=param)
            room = limit - len(ids)
            want = room if max_new is None else max_new
            if room < 1 or want > room:
                raise BadRequest(f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                                 f"tokens and {want} more were asked for (max_tokens). Shorten the prompt or lower "
                                 "max_tokens.", param=param if room < 1 else "max_tokens")
            for j in range(req.n):
                params.append((ids, self._SamplingParams(
                    max_tokens=want, temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k),
                    seed=None if req.seed is None else (req.seed + j) % 2**64, stop=req.stop_list,
                    stop_token_ids=list(req.stop_token_ids), presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                    repetition_penalty=req.repetition_penalty, min_p=req.min_p, logprobs=req.token_logprobs,
                    prompt_logprobs=req.prompt_logprobs)))
        return params

    # -- responses --------------------------------------------------------------------------

    async def _respond(self, kind: str, req: _Request, choices: list[_Choice], echo: list[str] | None) -> Response:
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if req.stream:
            return ClosingStream(self._stream(kind, req, rid, created, choices, echo),
                                 media_type="text/event-stream", headers={"cache-control": "no-cache"})
        try:
            await asyncio.gather(*(_drain(c) for c in choices))
        except BaseException:
            _cancel(choices)
            raise
        body: dict[str, Any] = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                                "created": created, "model": self.name, "system_fingerprint": _FINGERPRINT}
        wants = req.token_logprobs is not None
        if kind == "chat":
            body["choices"] = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                                "logprobs": chat_logprobs(self._text_of, c.logprobs) if wants else None,
                                "finish_reason": c.finish_reason} for c in choices]
        else:
            body["choices"] = [{"index": c.index, "text": (echo[c.prompt] if echo else "") + "".join(c.text),
                                "logprobs": self._completion_logprobs(c).body() if wants else None,
                                "finish_reason": c.finish_reason} for c in choices]
        body["usage"] = _usage(choices)
        return JSONResponse(body)

    def _completion_logprobs(self, c: _Choice, start: int = 0) -> CompletionLogprobs:
        """A completion's logprobs: the echoed prompt's (when asked for), then the generated tokens' from ``start``."""
        out = CompletionLogprobs(self._text_of)
        if c.prompt_logprobs is not None and start == 0:
            out.add_first(c.ids[0])
            for lp in c.prompt_logprobs[1:]:
                out.add(lp)
        for lp in c.logprobs[start:]:
            out.add(lp)
        return out

    async def _stream(self, kind: str, req: _Request, rid: str, created: int, choices: list[_Choice],
                      echo: list[str] | None) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        started: set[int] = set()
        wants = req.token_logprobs is not None
        done_lps: dict[int, int] = {}  # choice -> generated logprobs already sent

        def usage_field() -> dict[str, Any]:
            if req.continuous_usage:
                return {"usage": _usage(choices)}
            return {"usage": None} if req.include_usage else {}

        def logprobs(c: _Choice) -> dict[str, Any] | None:
            if not wants:
                return None
            first = done_lps.get(c.index)
            done_lps[c.index] = len(c.logprobs)
            if kind == "chat":
                return {"content": [chat_entry(self._text_of, lp) for lp in c.logprobs[first or 0 :]]}
            if first is None:
                return self._completion_logprobs(c).body()
            return self._completion_logprobs(c, first).body()

        def chunk(c: _Choice, text: str | None, finish: str | None) -> bytes:
            lps = logprobs(c) if finish is None else None
            if kind == "chat":
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if c.index not in started:
                    delta = {"role": "assistant", "content": text or ""}
                    started.add(c.index)
                choice: dict[str, Any] = {"index": c.index, "delta": delta, "logprobs": lps, "finish_reason": finish}
            else:
                if c.index not in started:
                    started.add(c.index)
                    text = (echo[c.prompt] if echo else "") + (text or "")
                choice = {"index": c.index, "text": text or "", "logprobs": lps, "finish_reason": finish}
            return _sse({"id": rid, "object": obj, "created": created, "model": self.name,
                         "system_fingerprint": _FINGERPRINT, "choices": [choice], **usage_field()})

        queue: asyncio.Queue[tuple[_Choice, Any]] = asyncio.Queue()
        pumps = [asyncio.create_task(_pump(c, queue)) for c in choices]
        open_choices = len(choices)
        try:
            while open_choices:
                c, ev = await queue.get()
                if isinstance(ev, BaseException):
                    err = ServeError(f"generation failed: {type(ev).__name__}: {ev}")
                    yield err.sse_ending()
                    return
                if ev is None:
                    open_choices -= 1
                    continue
                c.take(ev)
                # a chat stream opens each choice with its role; text chunks are empty only to carry logprobs
                if ev.text or (c.index not in started and (kind == "chat" or echo)) or (wants and ev.logprob is not None):
                    yield chunk(c, ev.text, None)
                if ev.finish_reason is not None:
                    yield chunk(c, None, ev.finish_reason)
            if req.include_usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": self.name,
                            "system_fingerprint": _FINGERPRINT, "choices": [], "usage": _usage(choices)})
            yield b"data: [DONE]\n\n"
        finally:
            for p in pumps:
                p.cancel()
            _cancel(choices)


async def _drain(c: _Choice) -> None:
    async for ev in c.handle.aiter():
        c.take(ev)


async def _pump(c: _Choice, queue: asyncio.Queue[tuple[_Choice, Any]]) -> None:
    try:
        async for ev in c.handle.aiter():
            await queue.put((c, ev))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # reported to the client as an SSE error by the consumer
        await queue.put((c, e))
        return
    await queue.put((c, None))


def _cancel(choices: Iterable[_Choice]) -> None:
    for c in choices:
        if c.finish_reason is None:
            c.handle.cancel()


def _usage(choices: list[_Choice]) -> dict[str, int]:
    prompt_tokens = {c.prompt: c.prompt_tokens for c in choices}  # each prompt once, whatever n is
    p = sum(prompt_tokens.values())
    k = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": p, "completion_tokens": k, "total_tokens": p + k}
