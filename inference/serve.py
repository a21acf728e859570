"""`python -m inference.serve`: an OpenAI-compatible server over continuous batching of
speculative decoding (`griffin_jax.engine`).

Examples:
  python -m inference.serve                                  # the default pair on 127.0.0.1:8000
  python -m inference.serve --base llama-dir --draft griffin-dir --max-batch 16 --port 9000
  python -m inference.serve --no-speculation                 # the same batching, plain decoding

  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "griffin-jax", "prompt": "def fib(n):", "max_tokens": 64}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus, `griffin_*`).
Request fields: max_tokens (max_completion_tokens for chat), temperature (0 = greedy), top_p,
top_k, seed, stop (strings), n (1 only), echo (completions), stream, stream_options.include_usage.
Options this server does not implement (logprobs, penalties, n > 1, best_of, logit_bias, tools,
...) are refused with a 400 that names them. Not supported at all: prefix caching, LoRA, serving
more than one model.

Admission runs between rounds: a new request's prefill delays the running rows' next round by
that forward's time. A prompt longer than `--chunked-prefill-size` tokens (default 256) is
prefilled that many tokens per engine step, between the other rows' rounds, so the delay each
step is one chunk's forward, not the whole prompt's (0 turns chunking off).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from griffin_jax import budget as budget_lib
from griffin_jax import checks, cli
from griffin_jax import engine as engine_lib

log = logging.getLogger("griffin_jax.serve")

DEFAULT_NAME = "griffin-jax"
# Role-tagged turns for bases without a chat template of their own (the default base).
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
                 "stream", "stream_options", "user"}  # fmt: skip
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
# Fields accepted only at the value that means "off" (anything else is refused by name).
OFF_VALUES = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "best_of": (None, 1), "logit_bias": (None, {}),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}), "repetition_penalty": (None, 1, 1.0),
    "min_p": (None, 0), "stream_options": (None,),
}  # fmt: skip


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        kinds = {400: "invalid_request_error", 401: "authentication_error",
                 404: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip
        return kinds.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}  # fmt: skip


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)


# ----------------------------------------------------------------------------- request parsing


@dataclasses.dataclass
class Parsed:
    """One validated request: the prompts as ids and the engine settings."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    settings: dict[str, Any]  # engine.Request fields but the prompt
    stops: list[str]
    stream: bool
    include_usage: bool
    echo: bool
    chat: bool


def _number(body: dict, name: str, default, *, integer: bool = False, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if value != value or (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise _bad(f"'{name}' must be in [{lo}, {hi}], got {value}", name)
    return value


class Frontend:
    """Turns OpenAI request bodies into engine requests and engine updates into responses."""

    def __init__(
        self, engine: engine_lib.Engine, tokenizer: Any, *, name: str, chat_template: str | None
    ) -> None:
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.chat_template = self.chat_template or PLAIN_CHAT_TEMPLATE

    def parse(self, body: Any, *, chat: bool) -> Parsed:
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
        refused = sorted(
            k for k, v in body.items()
            if k not in allowed and not (k in OFF_VALUES and v in OFF_VALUES[k])
        )  # fmt: skip
        if refused:
            raise _bad(f"unsupported option(s): {', '.join(refused)}", refused[0])
        model = body.get("model")
        if not isinstance(model, str):
            raise _bad("'model' is required (a string)", "model")
        if model != self.name:
            raise APIError(404, f"model '{model}' does not exist; this server serves "
                           f"'{self.name}'", param="model", code="model_not_found")  # fmt: skip
        if _number(body, "n", 1, integer=True, low=1) != 1:
            raise _bad("'n' > 1 is not supported", "n")
        if chat:
            prompts, texts = [self._chat_ids(body.get("messages"))], [""]
        else:
            prompts, texts = self._completion_ids(body.get("prompt"))
        limit = self.engine.max_model_len - max(len(p) for p in prompts)
        key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        default = limit if chat else 16
        max_new = _number(body, key, default, integer=True, low=1)
        if max_new > limit:
            raise _bad(
                f"prompt ({max(len(p) for p in prompts)} tokens) + '{key}' ({max_new}) exceeds "
                f"the context length {self.engine.max_model_len}", key,
            )  # fmt: skip
        settings = dict(
            max_new_tokens=max_new,
            temperature=float(_number(body, "temperature", 1.0, low=0, high=2)),
            top_p=float(_number(body, "top_p", 1.0, low=0, high=1)),
            top_k=_number(body, "top_k", 0, integer=True, low=-1),
            seed=_number(body, "seed", 0, integer=True, low=0, high=2**32 - 1),
        )
        if settings["top_p"] <= 0:
            raise _bad("'top_p' must be in (0, 1]", "top_p")
        settings["top_k"] = max(settings["top_k"], 0)  # -1 = off, as vLLM takes it
        stops = body.get("stop")
        stops = [] if stops is None else [stops] if isinstance(stops, str) else stops
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _bad("'stop' must be a non-empty string or a list of them", "stop")
        if len(stops) > 4:
            raise _bad("'stop' takes at most 4 strings", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("'stream' must be a boolean", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("'stream_options' takes only include_usage", "stream_options")
        echo = bool(body.get("echo", False))
        return Parsed(prompts, texts, settings, stops, stream, bool(options.get("include_usage")),
                      echo, chat)  # fmt: skip

    def _completion_ids(self, prompt: Any) -> tuple[list[list[int]], list[str]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise _bad("'prompt' must be a string, a list of strings, or token ids", "prompt")
        ids, texts = [], []
        for p in prompt:
            if isinstance(p, str):
                if not p:
                    raise _bad("'prompt' must not be empty", "prompt")
                ids.append(list(self.tokenizer(p)["input_ids"]))
                texts.append(p)
            elif isinstance(p, list) and p:
                try:
                    ids.append(checks.token_ids([p], vocab_size=self.engine.cfg.vocab_size)[0])
                except ValueError as err:
                    raise _bad(f"'prompt': {err}", "prompt") from None
                texts.append(self.tokenizer.decode(p))
            else:
                raise _bad("'prompt' must be a string, a list of strings, or token ids", "prompt")
        return ids, texts

    def _chat_ids(self, messages: Any) -> list[int]:
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages
        )  # fmt: skip
        if not ok:
            raise _bad("'messages' must be a non-empty list of {role, content} strings",
                       "messages")  # fmt: skip
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        ids = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """New ids -> text safe to send: whole characters, cut at the first stop string, holding
    back any tail that may be the start of one."""

    def __init__(self, frontend: Frontend, stops: list[str]) -> None:
        self.frontend, self.stops = frontend, stops
        self.ids: list[int] = []
        self.sent = 0  # characters sent
        self.stopped = False

    def push(self, ids: list[int], *, final: bool) -> str:
        self.ids.extend(ids)
        text = self.frontend.decode(self.ids)
        if text.endswith("\ufffd") and not final:  # an incomplete UTF-8 sequence
            text = text[:-1]
        cut = len(text)
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop) + 1))
            if at != -1 and at < cut:
                cut, self.stopped = at, True
        if not self.stopped and not final:
            for stop in self.stops:  # hold back a tail that a stop string may start with
                for n in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:n]):
                        cut = min(cut, len(text) - n)
                        break
        out = text[self.sent : max(cut, self.sent)]
        self.sent = max(cut, self.sent)
        return out


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """The `griffin_*` Prometheus series, in a registry of this server's own."""

    def __init__(self, engine: engine_lib.Engine) -> None:
        import prometheus_client as prom

        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "griffin_requests", "Requests by outcome (stop, length, cancelled, error, rejected)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = prom.Counter(
            "griffin_prompt_tokens", "Prompt tokens admitted", registry=r
        )
        self.generation_tokens = prom.Counter(
            "griffin_generation_tokens", "Tokens generated", registry=r
        )
        self.accepted = prom.Counter(
            "griffin_accepted_draft_tokens", "Draft tokens accepted", registry=r
        )
        self.rounds = prom.Counter(
            "griffin_verification_rounds", "Verification rounds (mean accepted length = "
            "(generation tokens - requests) / rounds + 1)", registry=r,
        )  # fmt: skip
        queue = prom.Gauge("griffin_queue_length", "Requests waiting for a slot", registry=r)
        queue.set_function(lambda: engine.queue_length)
        busy = prom.Gauge("griffin_busy_slots", "Slots decoding a request", registry=r)
        busy.set_function(lambda: engine.busy)
        overhead = prom.Gauge(
            "griffin_round_overhead_milliseconds", "What the serving loop adds to a round "
            "beyond its device cost, learnt as it runs (the adaptive budget prices every shape "
            "with it), by batch bucket", ["batch"], registry=r,
        )  # fmt: skip
        for b in engine.buckets:
            overhead.labels(batch=str(b)).set_function(lambda b=b: engine.round_overhead_ms[b])
        r.register(_RoundsByShape(engine))
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = prom.Histogram(
            "griffin_time_to_first_token_seconds", "Arrival to first token", buckets=buckets,
            registry=r,
        )  # fmt: skip
        self.itl = prom.Histogram(
            "griffin_inter_token_latency_seconds", "Time per generated token after the first",
            buckets=buckets, registry=r,
        )  # fmt: skip

    def text(self) -> bytes:
        import prometheus_client as prom

        return prom.generate_latest(self.registry)


class _RoundsByShape:
    """`griffin_rounds_by_shape_total{shape}`: verification rounds by round shape, read from
    the engine at each scrape ("none" = plain decode steps; with the adaptive budget, what it
    chose)."""

    def __init__(self, engine: engine_lib.Engine) -> None:
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "griffin_rounds_by_shape", "Verification rounds by round shape (top_k,depth,"
            "total_tokens[,draft_vocab]; none = a plain decode step)", labels=["shape"],
        )  # fmt: skip
        for shape, rounds in dict(self.engine.rounds_by_shape).items():
            family.add_metric([shape], rounds)
        yield family


# ----------------------------------------------------------------------------- the app


class _Run:
    """One engine request seen from the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int) -> None:
        self.loop, self.queue, self.index = loop, queue, index
        self.rid: int | None = None

    def __call__(self, update: engine_lib.Update) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, update))


def create_app(
    engine: engine_lib.Engine,
    tokenizer: Any,
    *,
    name: str = DEFAULT_NAME,
    api_key: str | None = None,
    chat_template: str | None = None,
):
    """The FastAPI app over a started engine (the caller starts and stops it)."""
    app = FastAPI(title="griffin-jax", docs_url=None, redoc_url=None)
    front = Frontend(engine, tokenizer, name=name, chat_template=chat_template)
    metrics = Metrics(engine)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        log.warning("%d %s", err.status, err.message)
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                err = APIError(401, "missing or wrong API key", code="invalid_api_key")
                log.warning("401 %s", request.url.path)
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return JSONResponse({"status": "dead", "reason": engine.dead}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "griffin-jax",
                                            "max_model_len": engine.max_model_len}]}  # fmt: skip

    async def body_of(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _bad(f"the request body is not valid JSON: {err}") from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, front.parse(await body_of(request), chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, front.parse(await body_of(request), chat=True))

    async def serve(request: Request, parsed: Parsed):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        runs = [_Run(loop, queue, i) for i in range(len(parsed.prompts))]
        arrival = time.perf_counter()
        try:
            for run, prompt in zip(runs, parsed.prompts, strict=True):
                req = engine_lib.Request(prompt=tuple(prompt), **parsed.settings)
                run.rid = engine.submit(req, run)
        except engine_lib.QueueFull as err:
            cancel(runs)
            metrics.requests.labels("rejected").inc()
            raise APIError(429, f"the server is busy: {err}", code="queue_full") from None
        except engine_lib.EngineDead as err:
            cancel(runs)
            raise APIError(503, f"the engine is not running: {err}") from None
        except ValueError as err:
            cancel(runs)
            raise _bad(str(err)) from None
        metrics.prompt_tokens.inc(sum(map(len, parsed.prompts)))
        rid = f"{'chatcmpl' if parsed.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        events = _events(request, parsed, runs, queue, arrival)
        if parsed.stream:
            return StreamingResponse(
                _sse(events, parsed, rid, name), media_type="text/event-stream"
            )
        texts = [""] * len(runs)
        reasons: list[str | None] = [None] * len(runs)
        usage = None
        async for kind, index, payload in events:
            if kind == "text":
                texts[index] += payload
            elif kind == "finish":
                reasons[index] = payload
            elif kind == "usage":
                usage = payload
        if "error" in reasons:
            raise APIError(500, "the round decoding this request failed (see the server log)")
        if parsed.echo:
            texts = [p + t for p, t in zip(parsed.prompt_texts, texts, strict=True)]
        created = int(time.time())
        if parsed.chat:
            choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                        "logprobs": None, "finish_reason": reasons[0]}]  # fmt: skip
            return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                    "choices": choices, "usage": usage}  # fmt: skip
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]  # fmt: skip
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": choices, "usage": usage}  # fmt: skip

    def cancel(runs: list[_Run]) -> None:
        for run in runs:
            if run.rid is not None:
                engine.cancel(run.rid)

    async def _events(request, parsed: Parsed, runs, queue, arrival) -> AsyncIterator[tuple]:
        """("text", i, str) / ("finish", i, reason) / ("usage", None, dict) as rounds land."""
        streams = [TextStream(front, parsed.stops) for _ in runs]
        left = len(runs)
        generated = 0
        last_time = [None] * len(runs)
        try:
            while left:
                try:
                    index, update = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        log.info("client went away: cancelling")
                        return
                    continue
                stream = streams[index]
                if stream.stopped:
                    continue  # rounds that landed after a stop string ended it
                now = time.perf_counter()
                if update.tokens:
                    if last_time[index] is None:
                        metrics.ttft.observe(now - arrival)
                    else:  # a round's tokens share its time
                        gap = (now - last_time[index]) / len(update.tokens)
                        for _ in update.tokens:
                            metrics.itl.observe(gap)
                    last_time[index] = now
                    generated += len(update.tokens)
                    metrics.generation_tokens.inc(len(update.tokens))
                text = stream.push(update.tokens, final=update.finish_reason is not None)
                reason = update.finish_reason
                if stream.stopped:
                    reason = "stop"
                    engine.cancel(runs[index].rid)
                if text:
                    yield "text", index, text
                if reason is not None:
                    if reason == "cancelled":
                        reason = "abort"  # the server is shutting down
                    metrics.requests.labels(reason).inc()
                    metrics.accepted.inc(update.accepted)
                    metrics.rounds.inc(update.rounds)
                    yield "finish", index, reason
                    left -= 1
            prompt_tokens = sum(map(len, parsed.prompts))
            yield "usage", None, {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                                  "total_tokens": prompt_tokens + generated}  # fmt: skip
        finally:
            if left:  # the client went away (or the stream was closed early)
                metrics.requests.labels("cancelled").inc(left)
                cancel(runs)

    async def _sse(events, parsed: Parsed, rid: str, model: str) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if parsed.chat else "text_completion"

        def chunk(index: int, text: str | None, reason: str | None, first: bool = False) -> str:
            if parsed.chat:
                delta = {"role": "assistant", "content": ""} if first else (
                    {"content": text} if text is not None else {}
                )  # fmt: skip
                choice = {"index": index, "delta": delta, "logprobs": None,
                          "finish_reason": reason}  # fmt: skip
            else:
                choice = {"index": index, "text": text or "", "logprobs": None,
                          "finish_reason": reason}  # fmt: skip
            body = {"id": rid, "object": kind, "created": created, "model": model,
                    "choices": [choice]}  # fmt: skip
            if parsed.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        try:
            if parsed.chat:
                yield chunk(0, None, None, first=True)
            if parsed.echo:
                for i, text in enumerate(parsed.prompt_texts):
                    yield chunk(i, text, None)
            async for what, index, payload in events:
                if what == "text":
                    yield chunk(index, payload, None)
                elif what == "finish":
                    if payload == "error":
                        err = APIError(500, "the round decoding this request failed")
                        yield f"data: {json.dumps(err.body())}\n\n"
                    yield chunk(index, None if parsed.chat else "", payload)
                elif what == "usage" and parsed.include_usage:
                    body = {"id": rid, "object": kind, "created": created, "model": model,
                            "choices": [], "usage": payload}  # fmt: skip
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away: the requests' slots are freed now
            await events.aclose()

    return app


class ThreadedServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port unless given), in a thread of this
    process: for tests and benchmarks that drive the server from the same process."""

    def __init__(self, app, port: int = 0) -> None:
        import socket
        import threading

        import uvicorn

        if not port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on port {port}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# ----------------------------------------------------------------------------- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(
        prog="python -m inference.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--base", help="base model folder (HF layout); default: the project's")
    p.add_argument("--draft", help="draft folder (GRIFFIN / EAGLE-2 / EAGLE-3); default: the "
                   "project's")  # fmt: skip
    p.add_argument("--served-model-name", default=DEFAULT_NAME)
    p.add_argument("--chat-template", type=pathlib.Path, help="a Jinja chat template file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch", type=int, default=8, help="requests decoding together")
    p.add_argument("--mesh", help="tensor parallel over a device mesh, e.g. data=1,model=8 "
                   "(default: one device; the data axis must be 1)")  # fmt: skip
    p.add_argument(
        "--max-model-len", type=int, default=None,
        help="prompt + new tokens of one request (default: min(2048, the base's limit))",
    )  # fmt: skip
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests, then 429")
    p.add_argument(
        "--chunked-prefill-size", type=int, default=256,
        help="prefill longer prompts this many tokens per step, between the other rows' rounds "
        "(0 = the whole prompt in one forward; else >= 16)",
    )  # fmt: skip
    p.add_argument("--api-key", default=None, help="require it as a Bearer token on /v1 "
                   "(default: $GRIFFIN_API_KEY; none = open)")  # fmt: skip
    p.add_argument("--no-speculation", action="store_true", help="plain decode steps")
    p.add_argument("--speculative-num-steps", type=int, default=None,
                   help="draft levels (the reference's depth + 1)")  # fmt: skip
    p.add_argument("--speculative-eagle-topk", type=int, default=None)
    p.add_argument("--speculative-num-draft-tokens", type=int, default=None,
                   help="tree tokens including the root (total_tokens)")  # fmt: skip
    p.add_argument("--draft-vocab", type=int, default=None)
    p.add_argument("--tree", default=None, help="auto | TOP_K,DEPTH,TOTAL_TOKENS[,DRAFT_VOCAB]")
    p.add_argument(
        "--warm-up", choices=("first", "greedy", "all"), default="first",
        help="what to compile before serving: the batch-1 programs of a short greedy request "
        "(first), or every round and admission program of greedy requests (greedy) or of "
        "greedy and sampled ones (all), so that no request stalls the others for a compile "
        "(minutes on a CPU)",
    )  # fmt: skip
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """(engine, tokenizer) from the flags; the engine is not started."""
    from inference.api import SpeculativeModel, tree_spec

    for flag in ("port", "max_batch", "max_queue", "max_model_len", "speculative_num_steps",
                 "speculative_eagle_topk", "speculative_num_draft_tokens"):  # fmt: skip
        cli.positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    cli.input_file(args.chat_template, "--chat-template")
    engine_lib.check_prefill_chunk(args.chunked_prefill_size, "--chunked-prefill-size")
    mesh = None
    if args.mesh:
        from griffin_jax import sharding

        try:
            mesh = sharding.make_mesh(args.mesh)
            engine_lib.check_mesh(mesh)  # before the model is loaded
        except ValueError as err:
            raise checks.InputError(f"--mesh {args.mesh}: {err}") from None
    aliases = dict(
        depth=None if args.speculative_num_steps is None else args.speculative_num_steps - 1,
        top_k=args.speculative_eagle_topk,
        total_tokens=args.speculative_num_draft_tokens,
        draft_vocab=args.draft_vocab,
    )
    sizes = {k: v for k, v in aliases.items() if v is not None}
    model = SpeculativeModel.from_pretrained(
        args.base, args.draft, dtype=args.dtype, with_draft=True, mesh=mesh,
        **sizes, **tree_spec(args.tree, aliases),
    )  # fmt: skip
    if not model.has_draft:
        raise checks.InputError("serving needs a draft (--draft), also with --no-speculation")
    limit = model.cfg.max_position_embeddings
    max_len = args.max_model_len or min(2048, limit)
    if model.adaptive and not args.no_speculation:
        tree = lambda batch: model.budget(batch, greedy=True)  # noqa: E731
    else:
        tree = model.tree_cfg
    eng = engine_lib.Engine(
        model.base_params, model.cfg, model.draft_params, model.dcfg, tree=tree,
        max_batch=args.max_batch, max_model_len=max_len, max_queue=args.max_queue,
        draft_head=model.draft_head(), speculate=not args.no_speculation, mesh=mesh,
        prefill_chunk=args.chunked_prefill_size,
    )  # fmt: skip
    shapes = ", ".join(budget_lib.describe(s) for s in eng.shapes)
    where = "one device" if mesh is None else f"mesh {dict(mesh.shape)}"
    log.info("engine: max_batch %d, max_model_len %d, round shapes %s, %s", eng.max_batch,
             eng.max_model_len, shapes, where)  # fmt: skip
    problem = engine_lib.compile_room(eng.program_count())
    if problem:  # programs compile at first use: a long-running server may reach them all
        log.warning("serving may compile every program: %s", problem)
    return eng, model.tokenizer


def warm_up(engine: engine_lib.Engine, mode: str = "first") -> float:
    """Compiles before serving (`--warm-up`): the batch-1 programs with one short greedy
    request, or with "greedy" / "all" every program `Engine.warm_up` knows; returns seconds."""
    t0 = time.perf_counter()
    if mode != "first":
        problem = engine_lib.compile_room(engine.program_count(sampled=mode == "all"))
        if problem:
            raise ValueError(f"--warm-up {mode}: {problem}")
        n = engine.warm_up(sampled=mode == "all")
        log.info("warm-up: %d programs compiled", n)
    done = []
    engine.submit(engine_lib.Request(prompt=(1, 2, 3), max_new_tokens=4), done.append)
    engine.run_until_idle()
    engine.forget_history()  # a made-up prompt: its acceptance is no prior for real ones
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    engine, tokenizer = build(args)
    log.info("warm-up compile: %.1f s", warm_up(engine, args.warm_up))
    template = args.chat_template.read_text() if args.chat_template else None
    api_key = args.api_key or os.environ.get("GRIFFIN_API_KEY") or None
    app = create_app(engine, tokenizer, name=args.served_model_name, api_key=api_key,
                     chat_template=template)  # fmt: skip
    import uvicorn

    engine.start()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=30)  # fmt: skip
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM (stop accepting, let open requests finish) and then re-raises
    # it to the handler found here: make that one a no-op so that the exit status is 0.
    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: stopped"))
    try:
        server.run()
    finally:
        engine.stop(drain=False, timeout=60)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(AttributeError):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    cli.use_compile_cache()
    raise SystemExit(cli.run(main))
