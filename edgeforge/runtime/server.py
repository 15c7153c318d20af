"""`edgeforge serve`: an OpenAI-compatible HTTP endpoint for one bundle (starlette app run by uvicorn).

Scheduling: every engine is one sequence at a time (reset/prefill/decode), so `--parallel N` opens N
engines (N KV caches). A request waits, first come first served, for a free engine; at most
`queue_limit` wait, the next gets 429 with Retry-After. Engine work runs in worker threads, never on
the event loop; between tokens the worker asks whether its client is gone, so a disconnect frees the
engine after at most one more token.

Batched decoding: where the graph allows it (ONNX bundles built with onnx.batch_decode), the N engines
are members of one BatchDecoder (runtime/onnx_batch.py): its own thread prefills each request (in
chunks between decode steps), decodes every active sequence in one call (the weights are read once
for all of them) and samples every row; the worker threads only turn tokens into text and stop
strings, so no step waits for them. A finished or cancelled request leaves the batch at once. The
worker threads, the queue and the streams are the same either way.

Copied into bundles: needs starlette and uvicorn (`pip install edgeforge[serve]` on a host) only when
serving; nothing else in the runtime imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from . import openai_wire as wire
from .bundle_errors import BundleError

logger = logging.getLogger("edgeforge.serve")

MAX_BODY_BYTES = 1 << 20      # 1 MiB: far more than any context this runtime holds, as text
RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.1
PROMPT_CACHE_MIB = 256          # serve --prompt-cache: earlier prompts' KV kept by a batch decoder
MAX_PROMPT_CACHE_MIB = 1 << 20


class ClientGone(Exception):
    """The client disconnected before its answer was ready: nothing is sent."""


class Slots:
    """The engines, handed out strictly in arrival order; a bounded number of requests may wait."""

    def __init__(self, sessions, queue_limit: int):
        self.all = list(sessions)
        self._free = list(sessions)
        self._waiters: deque[asyncio.Future] = deque()
        self.queue_limit = queue_limit

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    @property
    def busy(self) -> int:
        return len(self.all) - len(self._free)

    async def acquire(self):
        if self._free and not self.queued:
            return self._free.pop()
        if self.queued >= self.queue_limit:
            raise wire.ApiError(429, f"the server is busy: {len(self.all)} requests running and {self.queued} "
                                     "waiting (its queue is full); retry later", code="rate_limit_exceeded",
                                kind="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # handed an engine just as the client left: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def release(self, session) -> None:
        """On the event loop only."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(session)
                return
        self._free.append(session)


class Metrics:
    """Counters for GET /metrics (Prometheus text). Updated on the event loop only."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = 0
        self.prefill_seconds = self.decode_seconds = 0.0
        self.decode_tokens = 0
        self.cancelled = 0

    def count(self, route: str, status: int) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def add(self, done) -> None:
        self.prompt_tokens += done.prompt_tokens
        self.cached_tokens += done.cached_tokens
        self.completion_tokens += len(done.ids)
        self.cancelled += done.finish_reason == "cancelled"
        if done.result is not None:
            self.prefill_seconds += done.result.prefill_seconds
            self.decode_seconds += done.result.decode_seconds
            self.decode_tokens += max(len(done.ids) - 1, 0)

    def text(self, slots: Slots, decoder=None) -> str:
        errors = sum(n for (_, status), n in self.requests.items() if status >= 400)
        rate = lambda n, s: n / s if s > 0 else 0.0  # noqa: E731
        lines = ["# HELP edgeforge_requests_total HTTP requests answered, by route and status.",
                 "# TYPE edgeforge_requests_total counter"]
        lines += [f'edgeforge_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())]
        series = [
            ("errors_total", "counter", "Requests answered with a 4xx or 5xx status.", errors),
            ("prompt_tokens_total", "counter", "Prompt tokens processed (tokens in).", self.prompt_tokens),
            ("prompt_tokens_cached_total", "counter", "Prompt tokens whose KV positions an earlier prompt with the "
             "same beginning had computed (not prefilled again).", self.cached_tokens),
            ("completion_tokens_total", "counter", "Tokens generated (tokens out).", self.completion_tokens),
            ("cancelled_total", "counter", "Generations ended early because the client went away.", self.cancelled),
            ("prefill_seconds_total", "counter", "Seconds spent in prefill.", round(self.prefill_seconds, 6)),
            ("decode_seconds_total", "counter", "Seconds spent decoding.", round(self.decode_seconds, 6)),
            ("prefill_tokens_per_second", "gauge", "Prompt tokens prefilled a second over all requests so far "
             "(cached ones not counted).", round(rate(self.prompt_tokens - self.cached_tokens, self.prefill_seconds), 3)),
            ("decode_tokens_per_second", "gauge", "Decoded tokens a second (per engine) over all requests so far.",
             round(rate(self.decode_tokens, self.decode_seconds), 3)),
            ("queue_length", "gauge", "Requests waiting for an engine.", slots.queued),
            ("slots_busy", "gauge", "Engines generating now.", slots.busy),
            ("slots_total", "gauge", "Engines (--parallel).", len(slots.all)),
        ]
        if decoder is not None:
            series += [("decode_steps_total", "counter", "Batched decode calls (one step of every active sequence).",
                        decoder.steps),
                       ("decode_batch_size_mean", "gauge", "Sequences per batched decode call, on average.",
                        round(rate(decoder.stepped_rows, decoder.steps), 3))]
        for name, kind, help_text, value in series:
            lines += [f"# HELP edgeforge_{name} {help_text}", f"# TYPE edgeforge_{name} {kind}", f"edgeforge_{name} {value}"]
        return "\n".join(lines) + "\n"


class Job:
    """One generation on one engine, in a worker thread; text deltas arrive on an asyncio queue."""

    DONE = object()

    def __init__(self, server: "Server", session, ids: list[int], req: wire.Request, max_tokens: int):
        self.cancel = threading.Event()
        self.deltas: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        emit = (lambda d: loop.call_soon_threadsafe(self.deltas.put_nowait, d)) if req.stream else None
        work = lambda: session.generate(ids, max_tokens, req.temperature, req.top_p, req.seed,  # noqa: E731
                                        stop=req.stop, on_text=emit, cancelled=self.cancel.is_set,
                                        reuse_prefix=server.prompt_cache)
        self.future = asyncio.wrap_future(server.executor.submit(work))
        self.future.add_done_callback(lambda f: self._finished(server, session, f))

    def _finished(self, server, session, future) -> None:
        server.slots.release(session)
        server.jobs.discard(self)
        if not future.cancelled() and future.exception() is None:
            server.metrics.add(future.result())
        self.deltas.put_nowait(self.DONE)


class Server:
    def __init__(self, sessions, api_key: str | None = None, queue_limit: int = 16, model_ids=(),
                 prompt_cache: bool = True):
        self.sessions = sessions
        self.prompt_cache = prompt_cache  # start from an earlier prompt's KV positions where one begins alike
        self.model_id = sessions[0].model_id
        self.model_ids = {self.model_id, *model_ids}
        self.api_key = api_key
        self.queue_limit = queue_limit
        self.metrics = Metrics()
        self.jobs: set[Job] = set()
        self.slots: Slots | None = None
        self.executor = ThreadPoolExecutor(max_workers=len(sessions), thread_name_prefix="engine")
        self.decoder = getattr(sessions[0].engine, "decoder", None)  # the BatchDecoder, when batched
        self.started = time.time()

    # ---- routes ----------------------------------------------------------------------------------
    async def health(self, request):
        return self._json({"status": "ok", "model": self.model_id, "slots_total": len(self.slots.all),
                           "slots_busy": self.slots.busy, "queue_length": self.slots.queued})

    async def metrics_text(self, request):
        from starlette.responses import PlainTextResponse

        return PlainTextResponse(self.metrics.text(self.slots, self.decoder), media_type="text/plain; version=0.0.4")

    async def models(self, request):
        self._authorize(request)
        return self._json({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": int(self.started), "owned_by": "edgeforge"}]})

    async def chat(self, request):
        return await self._complete(request, wire.chat_request, "chat.completion.chunk")

    async def completions(self, request):
        return await self._complete(request, wire.completion_request, "text_completion")

    # ---- the completion path ---------------------------------------------------------------------
    async def _complete(self, request, parse, chunk_object: str):
        self._authorize(request)
        req = parse(wire.parse_body(await self._read_body(request)))
        if req.model not in self.model_ids:
            raise wire.ApiError(404, f"model {req.model[:80]!r} does not exist here; this server has "
                                     f"{self.model_id!r} (GET /v1/models)", "model", "model_not_found")
        ids = await self._encode(req)
        max_tokens = self._max_tokens(req, ids)
        session = await self._until_disconnect(request, self.slots.acquire())
        job = Job(self, session, ids, req, max_tokens)
        self.jobs.add(job)
        if req.stream:
            from starlette.responses import StreamingResponse

            return StreamingResponse(self._events(job, req, len(ids), chunk_object), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            done = await self._until_disconnect(request, asyncio.shield(job.future))
        except ClientGone:
            job.cancel.set()
            raise
        except Exception as err:  # noqa: BLE001 - an engine failure is this request's 500, not a crash
            logger.error(f"generation failed: {type(err).__name__}: {err}")
            raise wire.ApiError(500, f"generation failed: {err}", kind="server_error") from None
        rid = wire.new_id("chatcmpl" if chunk_object.startswith("chat") else "cmpl")
        make = wire.chat_answer if chunk_object.startswith("chat") else wire.completion_answer
        return self._json(make(rid, self.model_id, done.text, done.finish_reason, done.prompt_tokens, len(done.ids),
                               done.cached_tokens))

    async def _events(self, job: Job, req: wire.Request, prompt_tokens: int, chunk_object: str):
        """Server-sent events: OpenAI's chunks as text arrives, the finish reason, usage if asked, [DONE]."""
        chat = chunk_object.startswith("chat")
        rid = wire.new_id("chatcmpl" if chat else "cmpl")

        def chunk(text: str, reason: str | None = None) -> dict:
            if not chat:
                return wire.completion_chunk(rid, self.model_id, text, reason)
            return wire.chat_chunk(rid, self.model_id, {"content": text} if reason is None else {}, reason)

        try:
            if chat:
                yield wire.sse(wire.chat_chunk(rid, self.model_id, {"role": "assistant", "content": ""}))
            while (delta := await job.deltas.get()) is not Job.DONE:
                yield wire.sse(chunk(delta))
            try:
                done = job.future.result()
            except Exception as err:  # noqa: BLE001 - the stream has begun: report in-band, as OpenAI does
                logger.error(f"generation failed: {type(err).__name__}: {err}")
                yield wire.sse(wire.ApiError(500, f"generation failed: {err}", kind="server_error").body())
                return
            yield wire.sse(chunk("", done.finish_reason))
            if req.include_usage:
                yield wire.sse(wire.usage_chunk(rid, self.model_id, chunk_object, prompt_tokens, len(done.ids),
                                                done.cached_tokens))
            yield wire.sse("[DONE]")
        finally:
            job.cancel.set()  # the client left (the task is cancelled) or the stream ended: stop the engine

    async def _encode(self, req: wire.Request) -> list[int]:
        session = self.sessions[0]
        try:  # tokenizing a long prompt takes a while: off the event loop
            ids = await asyncio.to_thread(session.encode, req.prompt)
        except BundleError as err:
            raise wire.ApiError(400, str(err), "messages" if isinstance(req.prompt, list) else "prompt") from None
        if not ids:
            raise wire.ApiError(400, "the prompt has no tokens", "prompt")
        return ids

    def _max_tokens(self, req: wire.Request, ids: list[int]) -> int:
        context = self.sessions[0].context_length
        if context and len(ids) >= context:
            raise wire.ApiError(400, f"the prompt has {len(ids)} tokens and this server's context holds {context} "
                                     "(serve --ctx): shorten the prompt",
                                "messages" if isinstance(req.prompt, list) else "prompt", "context_length_exceeded")
        room = context - len(ids) if context else 1 << 20
        return min(req.max_tokens or room, room)  # max_tokens is capped by the context, like llama-server

    async def _until_disconnect(self, request, awaitable):
        """Await `awaitable`, cancelling it when the client disconnects first."""
        task = asyncio.ensure_future(awaitable)
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise ClientGone()

    async def _read_body(self, request) -> bytes:
        # JSON only: a web page can send a cross-site "simple" POST (text/plain, forms) to a server on the
        # household network without asking, but not an application/json one (the browser asks first, and
        # this server allows no other origins), so no page a user visits can spend the server's time.
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise wire.ApiError(415, f"send the request body as JSON with 'Content-Type: application/json' "
                                     f"(got {media_type[:60] or 'no content type'!r})", code="unsupported_media_type")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise self._too_large(int(declared))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise self._too_large(len(body))
        return bytes(body)

    @staticmethod
    def _too_large(size: int) -> wire.ApiError:
        return wire.ApiError(413, f"request body of {size} bytes is over this server's limit of {MAX_BODY_BYTES} bytes",
                             code="request_too_large")

    def _authorize(self, request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not reveal how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise wire.ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @staticmethod
    def _json(data, status: int = 200, headers=None):
        from starlette.responses import JSONResponse

        return JSONResponse(data, status_code=status, headers=headers)

    # ---- the app ---------------------------------------------------------------------------------
    def app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        async def api_error(request, err: wire.ApiError):
            return self._json(err.body(), err.status, err.headers)

        async def http_error(request, err: HTTPException):
            kind = "not_found" if err.status_code == 404 else None
            message = f"{request.method} {request.url.path}: {err.detail}"
            return self._json(wire.ApiError(err.status_code, message, code=kind).body(), err.status_code, err.headers)

        async def client_gone(request, err: ClientGone):
            from starlette.responses import Response

            return Response(status_code=499)  # nginx's "client closed request": never sent, only counted

        async def server_error(request, err: Exception):
            logger.error(f"{request.url.path}: {type(err).__name__}: {err}")
            return self._json(wire.ApiError(500, f"internal error ({type(err).__name__})", kind="server_error").body(), 500)

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.slots = Slots(self.sessions, self.queue_limit)
            yield
            for job in list(self.jobs):  # past the drain time: stop what still runs, between two tokens
                job.cancel.set()
            self.executor.shutdown(wait=True)

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        app = Starlette(routes=routes, lifespan=lifespan,
                        exception_handlers={wire.ApiError: api_error, HTTPException: http_error,
                                            ClientGone: client_gone, Exception: server_error})
        return _CountRequests(app, self.metrics)


class _CountRequests:
    """ASGI middleware: count every answered request by route and status for /metrics."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("path", "")[:64] if scope.get("path") in _ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count(route, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free port). Raises BundleError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, UnicodeError) as err:  # in use, not ours, or a host name that does not resolve
        sock.close()
        raise BundleError(f"--host {host} --port {port}: cannot listen there "
                          f"({getattr(err, 'strerror', None) or err})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_server(server: Server, sock: socket.socket, drain_seconds: float) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get `drain_seconds` to finish. Blocks. The signal
    that ended it is raised again afterwards (uvicorn), so the CLI exits 130 or 143."""
    import uvicorn

    # Connections past limit_concurrency get 503 at once, so idle or slow clients cannot pile up without end.
    slots = len(server.sessions)
    config = uvicorn.Config(server.app(), log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=drain_seconds, timeout_keep_alive=5,
                            limit_concurrency=max(64, 4 * (slots + server.queue_limit)))
    uvicorn.Server(config).run(sockets=[sock])


def serve_session(first, sock: socket.socket, api_key: str | None, parallel: int, queue_limit: int,
                  drain_seconds: float, announce, batch: bool = True, prompt_cache_mib: int = PROMPT_CACHE_MIB,
                  batch_invariant: bool = False) -> None:
    """Open the other engines next to `first` (an opened Session), say where it listens, serve. With
    `batch` and more than one engine, engines that can decode together do (Session.batched). A request
    whose prompt begins like an earlier one prefills only the rest (runtime/prefix.py), unless
    prompt_cache_mib is 0; a batch decoder keeps copies of finished prompts in at most that many MiB.
    `batch_invariant`: a lone sequence decodes with the batch's kernels too (BatchDecoder's invariant)."""
    sessions = first.batched(parallel, prompt_cache_mib << 20, batch_invariant) if batch and parallel > 1 else None
    batched = sessions is not None
    sessions = sessions or [first] + [first.sibling() for _ in range(parallel - 1)]
    server = Server(sessions, api_key=api_key, queue_limit=queue_limit, prompt_cache=prompt_cache_mib > 0)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    engines = f"{parallel} engine(s){', decoded in batches' if batched else ''}"
    if batched and batch_invariant:
        padded = sessions[0].engine.decoder.pad_lone_row
        engines += (", a lone sequence next to a scratch row (this CPU's one-row kernel rounds otherwise)" if padded
                    else ", batch-invariant (this CPU's one-row kernel rounds alike)")
    announce(f"serving {server.model_id} on http://{shown}:{port} ({engines}, queue {queue_limit}, "
             f"context {first.context_length or '?'} tokens, {'API key required' if api_key else 'no API key'})")
    if host not in ("127.0.0.1", "::1") and not api_key:
        announce(f"warning: listening on {host} without an API key: anyone who can reach this port can use it")
    run_server(server, sock, drain_seconds)


def check_api_key(key: str, where: str) -> str:
    key = key.strip()
    if len(key) < 8 or not key.isascii() or not key.isprintable() or " " in key:
        raise BundleError(f"{where}: an API key must be at least 8 printable ASCII characters without spaces")
    return key


def read_api_key_file(path) -> str:
    """The first line of an API key file."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(f"--api-key-file {path}: unreadable ({getattr(err, 'strerror', None) or err})") from None
    return check_api_key(lines[0] if lines else "", f"--api-key-file {path}")


def main(argv=None) -> int:
    """On a device without edgeforge, inside a bundle: python3 -m edgeforge_runtime.server BUNDLE [options]
    (PYTHONPATH=BUNDLE/runtime; starlette and uvicorn installed). The options mean what they mean for
    `edgeforge serve`; the API key comes from --api-key-file or $EDGEFORGE_API_KEY."""
    import argparse
    import os
    import signal
    import sys

    from .session import open_session

    ap = argparse.ArgumentParser(prog="python3 -m edgeforge_runtime.server", description=main.__doc__)
    ap.add_argument("bundle")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--api-key-file", default=None)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--queue", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=None)
    ap.add_argument("--drain", type=float, default=10.0)
    ap.add_argument("--trust", default=None, metavar="PUBKEY.pem")
    ap.add_argument("--no-batch", action="store_true", help="decode concurrent requests one call each")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="a request's answer never depends on the others decoded with it (see edgeforge serve --help)")
    ap.add_argument("--prompt-cache", type=int, default=PROMPT_CACHE_MIB, metavar="MIB",
                    help="MiB of earlier prompts' KV kept for prompts that begin alike; 0: none")
    args = ap.parse_args(argv)
    announce = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if (not 0 <= args.port <= 65535 or args.parallel < 1 or args.queue < 0 or (args.ctx is not None and args.ctx < 2)
                or not 0 <= args.prompt_cache <= MAX_PROMPT_CACHE_MIB):
            raise BundleError(f"--port must be 0..65535, --parallel >= 1, --queue >= 0, --ctx >= 2, "
                              f"--prompt-cache 0..{MAX_PROMPT_CACHE_MIB}")
        env_key = os.environ.get("EDGEFORGE_API_KEY")
        key = (read_api_key_file(args.api_key_file) if args.api_key_file
               else check_api_key(env_key, "$EDGEFORGE_API_KEY") if env_key is not None else None)
        sock = bind(args.host, args.port)
        first = open_session(args.bundle, max_length=args.ctx, trust=args.trust)
        serve_session(first, sock, key, args.parallel, args.queue, args.drain, announce, batch=not args.no_batch,
                      prompt_cache_mib=args.prompt_cache, batch_invariant=args.batch_invariant)
    except BundleError as err:
        announce(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
