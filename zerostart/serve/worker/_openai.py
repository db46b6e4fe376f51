"""The OpenAI routes of a worker, over a loaded :class:`zerostart.engine.Engine`.

Chat and text completions, streamed (SSE) and not, with ``n`` choices and several prompts per
request; ``usage`` counts each prompt once and every choice's tokens. Chat requests may carry
``tools`` (calls parsed from the output, forced by a grammar for ``tool_choice`` "required" or a
named function) and ``response_format`` (a grammar); completions ``response_format`` too.
Embeddings (for a model served as one), ``/tokenize`` and ``/detokenize`` are ``_embeddings.py``'s
and ``_tokenize.py``'s. Every answer ends with what it cost the engine (``control.RequestStats``).
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
from zerostart.engine import EngineError, SamplingParams, TokenText, render_chat, tool_parser
from zerostart.serve._config import EmbeddingConfig
from zerostart.serve.edge import (BadRequest, ChatCompletionRequest, ClosingStream, CompletionRequest, DetokenizeRequest,
                                  EmbeddingRequest, GenerateRequest, ServeError, TokenizeRequest, model_card, model_list,
                                  parse_body)
from zerostart.serve.control import STATS_HEADER
from zerostart.serve.worker import _embeddings, _tokenize
from zerostart.serve.worker._logprobs import CompletionLogprobs, chat_entry, chat_logprobs
from zerostart.serve.worker._stats import Timing, request_stats
from zerostart.serve.worker._structured import (GrammarBudget, Grammars, Plan, call_json, chat_plan,
                                                format_constraint)

if TYPE_CHECKING:
    from zerostart.engine import Engine, ToolParser, ToolStream

_FINGERPRINT = f"zerostart-{__version__}"
# A request of more sequences than this (or with a grammar, copied into each) is submitted from a
# thread: each sequence costs the engine a detokenizer and a matcher, milliseconds for a large grammar
_SUBMIT_ON_LOOP = 16


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


class _Choice:
    """One sequence being generated: which prompt it continues and what it has produced."""

    def __init__(self, index: int, prompt: int, handle: Any, ids: list[int]) -> None:
        self.index = index
        self.prompt = prompt  # index into the request's prompts
        self.handle = handle
        self.ids = ids  # the prompt's token ids
        self.text: list[str] = []
        self.finish_reason: str | None = None  # the engine's: stop, length, abort
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.logprobs: list[Any] = []  # TokenLogprob per generated token (when asked for)
        self.prompt_logprobs: list[Any] | None = None
        self.timing = Timing(handle)
        self.tools: ToolStream | None = None  # a chat stream's tool-call parser
        self.calls = 0  # tool calls found so far

    def take(self, ev: Any) -> None:
        self.text.append(ev.text)
        self.timing.take(ev)
        if ev.logprob is not None:
            self.logprobs.append(ev.logprob)
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        self.prompt_tokens = ev.prompt_tokens
        self.completion_tokens = ev.completion_tokens
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason


class OpenAIRoutes:
    def __init__(self, engine: Engine, name: str, root: str = "", embedding: EmbeddingConfig | None = None,
                 grammar_budget: GrammarBudget | None = None) -> None:
        self.engine = engine
        self.grammars = Grammars(engine, grammar_budget or GrammarBudget())
        self.name = name
        self.root = root or name  # the model's source, as vLLM's /v1/models "root"
        self.embedding = embedding
        self.created = int(time.time())
        self._SamplingParams = SamplingParams
        self._text_of = TokenText(engine.tokenizer)
        self._parser: ToolParser | None = None

    @property
    def parser(self) -> ToolParser:
        """The tool-call format of this model's chat template (Hermes when it has none of its own)."""
        if self._parser is None:
            tok = self.engine.tokenizer
            try:
                template = tok.get_chat_template()
            except EngineError:
                template = ""
            self._parser = tool_parser(None, tok, template)
        return self._parser

    # -- routes -----------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        card = model_card(self.name, self.created, root=self.root, max_model_len=self.engine.max_model_len)
        return JSONResponse(model_list([card]))

    # Nothing whose cost grows with the request runs on the event loop: parsing a large body,
    # tool grammars, chat templates, tokenization, compiling grammars (within a budget),
    # submitting many sequences, building and encoding a whole answer, detokenizing run on
    # threads, so the loop keeps streaming the other requests' tokens and answering the
    # gateway's probe meanwhile.

    async def chat(self, request: Request) -> Response:
        try:
            req = await parse_body(ChatCompletionRequest, await request.body())
            assert isinstance(req, ChatCompletionRequest)
            self._generating()
            plan, prompt = await asyncio.to_thread(self._chat_setup, req)
            await self.grammars.compile(plan.constraint, plan.param)
            choices = await self._start(req, [prompt], req.max_new_tokens, param="messages", plan=plan)
        except ServeError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return await self._respond("chat", req, choices, None, plan)

    async def completions(self, request: Request) -> Response:
        try:
            req = await parse_body(CompletionRequest, await request.body())
            assert isinstance(req, CompletionRequest)
            self._generating()
            given = req.prompts()
            prompts = await asyncio.to_thread(lambda: [self._encode(p) for p in given])
            plan = Plan(None, None, format_constraint(req.response_format), False)
            await self.grammars.compile(plan.constraint, plan.param)
            choices = await self._start(req, prompts, req.max_new_tokens, param="prompt", plan=plan)
        except ServeError as e:
            return JSONResponse(e.body(), status_code=e.status)
        try:
            # echo gives back the prompt as it was sent (token prompts as their text)
            echo = await asyncio.to_thread(
                lambda: [p if isinstance(p, str) else self.engine.tokenizer.decode(p) for p in given]) if req.echo else None
        except BaseException:
            _cancel(choices)
            raise
        return await self._respond("text", req, choices, echo, plan)
    async def embeddings(self, request: Request) -> Response:
        try:
            req = await parse_body(EmbeddingRequest, await request.body())
            assert isinstance(req, EmbeddingRequest)
            if self.embedding is None:
                raise BadRequest(f"model {self.name!r} generates text; it is not served as an embedding model "
                                 "(set `embedding:` in its config)", param="model")
            prompts = await asyncio.to_thread(lambda: [self._encode(p) for p in req.inputs()])
            run = _embeddings.Run(self.engine, req, self.embedding, prompts)
            body, stats = await run.result(self.name)
        except ServeError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return await _json(lambda: body, {STATS_HEADER: stats.to_header()})

    async def tokenize(self, request: Request) -> Response:
        try:
            req = await parse_body(TokenizeRequest, await request.body())
            assert isinstance(req, TokenizeRequest)
            return await _json(lambda: _tokenize.tokenize(self.engine.tokenizer, self.engine.max_model_len, req))
        except ServeError as e:
            return JSONResponse(e.body(), status_code=e.status)

    async def detokenize(self, request: Request) -> Response:
        try:
            req = await parse_body(DetokenizeRequest, await request.body())
            assert isinstance(req, DetokenizeRequest)
            return await _json(lambda: _tokenize.detokenize(self.engine.tokenizer, req))
        except ServeError as e:
            return JSONResponse(e.body(), status_code=e.status)

    async def tokenizer_info(self, request: Request) -> Response:
        return JSONResponse(_tokenize.tokenizer_info(self.engine.tokenizer, self.engine.max_model_len))

    # -- prompts and sampling ---------------------------------------------------------------

    def _generating(self) -> None:
        if self.embedding is not None:
            raise BadRequest(f"model {self.name!r} is an embedding model; use /v1/embeddings", param="model")

    def _chat_setup(self, req: ChatCompletionRequest) -> tuple[Plan, list[int]]:
        """The request's plan (its tools' grammar) and its prompt (on a thread)."""
        plan = chat_plan(self.parser, req)
        return plan, self._chat_prompt(req, plan)

    def _chat_prompt(self, req: ChatCompletionRequest, plan: Plan) -> list[int]:
        tok = self.engine.tokenizer
        try:
            text = render_chat(tok, req.template_messages(), tools=plan.tools)
        except (EngineError, KeyError, TypeError) as e:
            raise BadRequest(f"model {self.name!r} could not format these messages with its chat template ({e}); "
                             "use /v1/completions with a plain prompt instead", param="messages") from None
        return list(tok.encode(text, add_special_tokens=False))

    def _encode(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else list(self.engine.tokenizer.encode(prompt))

    async def _start(self, req: GenerateRequest, prompts: list[list[int]], max_new: int | None, param: str,
                     plan: Plan) -> list[_Choice]:
        """:meth:`_submit`, from a thread when it is heavy; sequences submitted for a request
        that is cancelled meanwhile are cancelled as soon as the thread has made them."""
        if plan.constraint is None and len(prompts) * req.n <= _SUBMIT_ON_LOOP:
            return self._submit(req, prompts, max_new, param, plan)
        job = asyncio.ensure_future(asyncio.to_thread(self._submit, req, prompts, max_new, param, plan))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(_cancel_made)
            raise

    def _submit(self, req: GenerateRequest, prompts: list[list[int]], max_new: int | None, param: str,
                plan: Plan) -> list[_Choice]:
        try:
            params = self._params(req, prompts, max_new, param, plan)
        except ValueError as e:  # the engine's own checks of the sampling parameters
            raise BadRequest(str(e)) from None
        choices: list[_Choice] = []
        group = object()  # this request's sequences share the engine's slots fairly with other requests'
        try:
            for i, (ids, sp) in enumerate(params):
                choices.append(_Choice(i, i // req.n, self.engine.submit(ids, sp, group=group), ids))
        except ValueError as e:  # the engine refuses what it cannot run (a token id past its vocabulary, a grammar)
            _cancel(choices)
            raise BadRequest(str(e), param=plan.param if plan.constraint and "grammar" in str(e) else param) from None
        return choices

    def _params(self, req: GenerateRequest, prompts: list[list[int]], max_new: int | None, param: str,
                plan: Plan) -> list[tuple[list[int], Any]]:
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
                    prompt_logprobs=req.prompt_logprobs, constraint=plan.constraint,
                    skip_special_tokens=not plan.keep_special_tokens)))
        return params

    # -- responses --------------------------------------------------------------------------

    async def _respond(self, kind: str, req: GenerateRequest, choices: list[_Choice], echo: list[str] | None,
                       plan: Plan) -> Response:
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if req.stream:
            return ClosingStream(self._stream(kind, req, rid, created, choices, echo, plan),
                                 media_type="text/event-stream", headers={"cache-control": "no-cache"})
        try:
            await asyncio.gather(*(_drain(c) for c in choices))
        except BaseException:
            _cancel(choices)
            raise
        return await _json(lambda: self._body(kind, req, rid, created, choices, echo, plan))

    def _body(self, kind: str, req: GenerateRequest, rid: str, created: int, choices: list[_Choice], echo: list[str] | None,
              plan: Plan) -> tuple[dict[str, Any], dict[str, str]]:
        """A whole answer and its headers (on a thread: logprobs of thousands of tokens take a while)."""
        body: dict[str, Any] = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                                "created": created, "model": self.name, "system_fingerprint": _FINGERPRINT}
        wants = req.token_logprobs is not None
        if kind == "chat":
            assert isinstance(req, ChatCompletionRequest)
            body["choices"] = [{"index": c.index, "message": _message("".join(c.text), plan),
                                "logprobs": chat_logprobs(self._text_of, c.logprobs) if wants else None}
                               for c in choices]
            for c, out in zip(choices, body["choices"]):
                out["finish_reason"] = _finish(c.finish_reason, "tool_calls" in out["message"], req)
        else:
            body["choices"] = [{"index": c.index, "text": (echo[c.prompt] if echo else "") + "".join(c.text),
                                "logprobs": self._completion_logprobs(c).body() if wants else None,
                                "finish_reason": c.finish_reason} for c in choices]
        body["usage"] = _usage(choices)
        stats = request_stats(body["usage"], [c.timing for c in choices])
        return body, {STATS_HEADER: stats.to_header()}

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

    async def _stream(self, kind: str, req: GenerateRequest, rid: str, created: int, choices: list[_Choice],
                      echo: list[str] | None, plan: Plan) -> AsyncIterator[bytes]:
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
            return self._completion_logprobs(c, first or 0).body()

        def chunk(c: _Choice, delta: dict[str, Any], finish: str | None, lps: bool = True) -> bytes:
            """A chat chunk (``delta``: content or tool_calls) or a text chunk (``delta["content"]``)."""
            lp = logprobs(c) if lps and finish is None else None
            if kind == "chat":
                if c.index not in started:
                    delta = {"role": "assistant", "content": "", **delta}
                    started.add(c.index)
                choice: dict[str, Any] = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                text = delta.get("content") or ""
                if c.index not in started:
                    started.add(c.index)
                    text = (echo[c.prompt] if echo else "") + text
                choice = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}
            return _sse({"id": rid, "object": obj, "created": created, "model": self.name,
                         "system_fingerprint": _FINGERPRINT, "choices": [choice], **usage_field()})

        def calls_chunk(c: _Choice, calls: list[Any]) -> bytes:
            deltas = []
            for call in calls:
                deltas.append({"index": c.calls, **call_json(call)})
                c.calls += 1
            return chunk(c, {"tool_calls": deltas}, None, lps=False)

        if kind == "chat" and plan.parser is not None:
            for c in choices:
                c.tools = plan.parser.stream()
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
                text, calls = c.tools.feed(ev.text) if c.tools is not None else (ev.text, [])
                # a chat stream opens each choice with its role; text chunks are empty only to carry logprobs
                if text or (c.index not in started and (kind == "chat" or echo)) or (wants and ev.logprob is not None):
                    yield chunk(c, {"content": text} if text or kind != "chat" else {}, None)
                if calls:
                    yield calls_chunk(c, calls)
                if ev.finish_reason is not None:
                    if c.tools is not None:
                        text, calls = c.tools.finish()
                        if text:
                            yield chunk(c, {"content": text}, None, lps=False)
                        if calls:
                            yield calls_chunk(c, calls)
                    finish = ev.finish_reason
                    if kind == "chat":
                        assert isinstance(req, ChatCompletionRequest)
                        finish = _finish(finish, c.calls > 0, req)
                    yield chunk(c, {}, finish)
            usage = _usage(choices)
            if req.include_usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": self.name,
                            "system_fingerprint": _FINGERPRINT, "choices": [], "usage": usage})
            stats = request_stats(usage, [c.timing for c in choices])
            yield f": {STATS_HEADER} {stats.to_header()}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            for p in pumps:
                p.cancel()
            _cancel(choices)


def _message(text: str, plan: Plan) -> dict[str, Any]:
    """An assistant message: its content, and the tool calls parsed from it when tools were offered."""
    if plan.parser is None:
        return {"role": "assistant", "content": text}
    content, calls = plan.parser.parse(text)
    out: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        out["tool_calls"] = [call_json(c) for c in calls]
    return out


def _finish(reason: str | None, called: bool, req: ChatCompletionRequest) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when the model chose to call (not for a named
    tool_choice, where OpenAI says "stop")."""
    forced = req.forced_tool
    return "tool_calls" if called and reason == "stop" and forced in (None, "required") else reason


async def _drain(c: _Choice) -> None:
    await c.handle.ended()  # the events carry their own times (the stats' gaps)
    for ev in c.handle:
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


async def _json(make: Any, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer made and encoded on a thread; ``make()`` returns the body, or the body and
    its headers (an answer of many choices, logprobs or vectors is megabytes of JSON)."""

    def render() -> tuple[bytes, dict[str, str] | None]:
        made = make()
        body, more = made if isinstance(made, tuple) else (made, None)
        return _dumps(body), {**(headers or {}), **(more or {})}

    content, all_headers = await asyncio.to_thread(render)
    return Response(content, media_type="application/json", headers=all_headers)


def _cancel_made(job: asyncio.Future[list[_Choice]]) -> None:
    """Cancel the sequences a submission made for a request that is gone."""
    if not job.cancelled() and job.exception() is None:
        _cancel(job.result())


def _cancel(choices: Iterable[_Choice]) -> None:
    for c in choices:
        if c.finish_reason is None:
            c.handle.cancel()


def _usage(choices: list[_Choice]) -> dict[str, int]:
    prompt_tokens = {c.prompt: c.prompt_tokens for c in choices}  # each prompt once, whatever n is
    p = sum(prompt_tokens.values())
    k = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": p, "completion_tokens": k, "total_tokens": p + k}
