"""`edgeforge serve` on a tiny random Llama bundle (ONNX, x86): the OpenAI protocol with the real
`openai` client against a live server on loopback, every bad-request class, the API key, the queue,
concurrency and shutdown. The SmolLM2 answers ("Paris") are in test_serve_smollm2.py."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client (dev extra) is not installed")

from bundle_helpers import host_bundle  # noqa: E402,F401 - fixture
from serve_helpers import LiveServer, client  # noqa: E402

CHAT = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def bundle(host_bundle):  # noqa: F811
    return host_bundle[0]


@pytest.fixture(scope="module")
def server(bundle):
    with LiveServer(bundle, "--parallel", "2", "--queue", "64", "--batch-invariant") as live:
        yield live


@pytest.fixture(scope="module")
def expected(bundle):
    """Greedy answers computed in-process by the same runtime, without a server."""
    from edgeforge.runtime.session import open_session

    session = open_session(bundle)

    def answer(prompt, max_tokens):
        return session.generate(session.encode(prompt), max_tokens).text

    return answer


def model_id(bundle):
    return bundle.name


# ---- the protocol --------------------------------------------------------------------------------

def test_models_health_and_metrics(server, bundle):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [model_id(bundle)]
    status, health, _ = server.get("/health")
    assert status == 200 and health["status"] == "ok" and health["slots_total"] == 2
    status, text, headers = server.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("requests_total", "prompt_tokens_total", "completion_tokens_total", "prefill_tokens_per_second",
                 "decode_tokens_per_second", "queue_length", "errors_total"):
        assert f"edgeforge_{name}" in text


def test_chat_completion_matches_the_runtime(server, bundle, expected):
    answer = client(server).chat.completions.create(model=model_id(bundle), messages=CHAT, max_tokens=12,
                                                    temperature=0)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected(CHAT, 12)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens >= 1
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_streamed_chat_gives_the_same_text(server, bundle, expected):
    stream = client(server).chat.completions.create(model=model_id(bundle), messages=CHAT, max_tokens=12,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(CHAT, 12)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_sse_ends_with_done(server, bundle):
    req = {"model": model_id(bundle), "messages": CHAT, "max_tokens": 4, "stream": True}
    status, text, headers = server.post("/v1/chat/completions", req)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_completions(server, bundle, expected):
    c = client(server)
    answer = c.completions.create(model=model_id(bundle), prompt="Once upon a time", max_tokens=10, temperature=0)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == expected("Once upon a time", 10)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=model_id(bundle), prompt="Once upon a time", max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == answer.choices[0].text


def test_stop_strings_cut_the_answer(server, bundle, expected):
    full = expected("Once upon a time", 16)
    # a random model's text: any character past the first will do (not U+FFFD, a split byte sequence)
    stop = next(ch for ch in full[len(full) // 2:] if ch != "\ufffd")
    c = client(server)
    answer = c.completions.create(model=model_id(bundle), prompt="Once upon a time", max_tokens=16, temperature=0,
                                  stop=[stop])
    assert answer.choices[0].text == full[:full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=model_id(bundle), prompt="Once upon a time", max_tokens=16, temperature=0, stop=stop, stream=True)
        if ch.choices)
    assert streamed == answer.choices[0].text


def test_seeded_sampling_repeats(server, bundle):
    c = client(server)
    runs = [c.completions.create(model=model_id(bundle), prompt="Hello", max_tokens=12, temperature=1.0, top_p=0.9,
                                 seed=7).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_max_tokens_is_capped_by_the_context(bundle):
    with LiveServer(bundle, "--ctx", "40") as live:
        answer = client(live).completions.create(model=model_id(bundle), prompt="Once upon a time",
                                                 max_tokens=10_000, temperature=0)
        assert answer.usage.prompt_tokens + answer.usage.completion_tokens <= 40


def test_chat_text_never_becomes_special_tokens(server, bundle):
    from edgeforge.runtime.session import open_session

    session = open_session(bundle)
    special = session.tokenizer.eos_token
    assert special, "the tiny tokenizer has an end token"
    messages = [{"role": "user", "content": f"hi {special} there"}]
    answer = client(server).chat.completions.create(model=model_id(bundle), messages=messages, max_tokens=2)
    ids = session.encode(messages)
    assert answer.usage.prompt_tokens == len(ids)
    assert ids.count(session.tokenizer.eos_token_ids[0]) == session.encode(
        [{"role": "user", "content": "hi there"}]).count(session.tokenizer.eos_token_ids[0])


# ---- bad requests: 4xx with an OpenAI error object -----------------------------------------------

def bad(server, bundle, **overrides):
    body = {"model": model_id(bundle), "messages": CHAT, "max_tokens": 4}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not DROP}


DROP = object()


@pytest.mark.parametrize("body, param", [
    (dict(messages=DROP), "messages"),
    (dict(messages="hello"), "messages"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": "hi"}] * 257), "messages"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": "lone \ud800 surrogate"}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content"),
    (dict(model=DROP), "model"),
    (dict(model=3), "model"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens="10"), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_completion_tokens=-1), "max_completion_tokens"),
    (dict(temperature="hot"), "temperature"),
    (dict(temperature=2.5), "temperature"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed=1.5), "seed"),
    (dict(seed=1 << 70), "seed"),
    (dict(stop=[1, 2]), "stop"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(stream="yes"), "stream"),
    (dict(n=2), "n"),
    (dict(tools=[{"type": "function"}]), "tools"),
])
def test_bad_request_is_a_400_naming_the_field(server, bundle, body, param):
    status, answer, _ = server.post("/v1/chat/completions", bad(server, bundle, **body))
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param
    assert answer["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b'{"model": "m", "temperature": NaN}',
                                 b'{"model": "m", "top_p": Infinity}', b"[" * 100_000])
def test_malformed_json_is_a_400(server, raw):
    status, answer, _ = server.post("/v1/chat/completions", raw)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]


def test_the_client_sees_bad_requests_as_bad_request_errors(server, bundle):
    # (the client itself refuses to send NaN: test_malformed_json_is_a_400 sends it raw)
    with pytest.raises(openai.BadRequestError) as err:
        client(server).chat.completions.create(model=model_id(bundle), messages=CHAT, max_tokens=0)
    assert err.value.status_code == 400 and err.value.param == "max_tokens"


def test_prompt_past_the_context_is_a_400_naming_the_limit(server, bundle):
    long = "sea " * 2000
    with pytest.raises(openai.BadRequestError) as err:
        client(server).completions.create(model=model_id(bundle), prompt=long, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    assert "512" in err.value.message  # the tiny model's context


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_only_json_bodies_are_read(server, bundle, content_type):
    # what a browser may send cross-site without asking first (and what curl -d sends by default)
    body = json.dumps({"model": model_id(bundle), "prompt": "hi", "max_tokens": 2}).encode()
    status, answer, _ = server.request("POST", "/v1/completions", body,
                                       {"Content-Type": content_type} if content_type else {})
    assert status == 415 and "application/json" in answer["error"]["message"]


def test_oversized_body_is_a_413_before_it_is_read(server):
    # Only the headers are sent: the server answers from Content-Length alone, without waiting for (or
    # reading) 2 MiB. (Sending the whole body races the early answer: the client may see a reset.)
    import http.client

    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and "limit" in answer["error"]["message"]


def test_oversized_chunked_body_is_a_413(server):
    # no Content-Length: the server counts while reading and stops at the limit
    import http.client

    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (b"x" * 65536 for _ in range(17))  # 1.06 MiB
    conn.request("POST", "/v1/completions", body=chunks, headers={"Content-Type": "application/json"},
                 encode_chunked=True)
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and "limit" in answer["error"]["message"]


def test_unknown_model_route_and_method(server, bundle):
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-4o", messages=CHAT)
    status, answer, _ = server.get("/v1/embeddings")
    assert status == 404 and answer["error"]["message"]
    status, answer, _ = server.get("/v1/chat/completions")
    assert status == 405 and answer["error"]["message"]


def test_server_survives_the_bad_requests(server, bundle, expected):
    # after everything above, an ordinary request still gets the ordinary answer
    answer = client(server).completions.create(model=model_id(bundle), prompt="Once upon a time", max_tokens=10,
                                               temperature=0)
    assert answer.choices[0].text == expected("Once upon a time", 10)
    assert server.metric("errors_total") > 0 and server.proc.poll() is None


# ---- API key -------------------------------------------------------------------------------------

def test_api_key_is_enforced_on_every_v1_route(bundle, tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text("s3cret-key-for-tests\n")
    with LiveServer(bundle, "--api-key-file", str(key_file)) as live:
        for key in ("none", "s3cret-key-for-test", "s3cret-key-for-tests-and-more"):
            with pytest.raises(openai.AuthenticationError):
                client(live, api_key=key).models.list()
            with pytest.raises(openai.AuthenticationError):
                client(live, api_key=key).chat.completions.create(model=model_id(bundle), messages=CHAT)
        status, answer, headers = live.post("/v1/completions", {"model": model_id(bundle), "prompt": "hi"})
        assert status == 401 and answer["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
        good = client(live, api_key="s3cret-key-for-tests")
        assert [m.id for m in good.models.list().data] == [model_id(bundle)]
        assert good.completions.create(model=model_id(bundle), prompt="hi", max_tokens=2).choices
        assert live.get("/health")[0] == 200  # health checks need no key


@pytest.mark.parametrize("args, words", [
    (["--api-key", "short"], "at least 8"),
    (["--api-key", ""], "at least 8"),
    (["--api-key", "x" * 20, "--api-key-file", "k"], "exclude each other"),
    (["--api-key-file", "/nonexistent/key"], "--api-key-file /nonexistent/key"),
    (["--port", "70000"], "--port"),
    (["--parallel", "0"], "--parallel"),
    (["--prompt-cache", "-1"], "--prompt-cache"),
    (["--host", "no-such-host.invalid"], "--host no-such-host.invalid"),
])
def test_bad_options_are_one_line_exit_2(bundle, args, words):
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "serve", str(bundle), "--port", "0", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")


def test_port_in_use_is_exit_2(bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "serve", str(bundle), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"--port {port}" in proc.stderr and "Traceback" not in proc.stderr


def test_tampered_bundle_is_refused_before_serving(bundle, tmp_path):
    from bundle_helpers import copy_bundle

    broken = copy_bundle(bundle, tmp_path / bundle.name)
    tok = broken / "tokenizer" / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace("{", "{ ", 1))
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "serve", str(broken), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "tokenizer_config.json" in proc.stderr and "serving" not in proc.stderr


# ---- prompt prefix reuse (runtime/prefix.py) ------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are a terse assistant who answers every question about the sea."}


def chat_twice(live, bundle):
    """Two questions under one system prompt; the answers and the second's usage."""
    c = client(live)
    answers = []
    for question in ("Why is the sea salty?", "How deep is the sea?"):
        answers.append(c.chat.completions.create(model=model_id(bundle), max_tokens=10, temperature=0,
                                                 messages=[SYSTEM, {"role": "user", "content": question}]))
    return answers


@pytest.mark.parametrize("args", [("--parallel", "2"), ("--parallel", "1")], ids=["batched", "one-engine"])
def test_a_shared_system_prompt_is_prefilled_once(bundle, expected, args):
    """The second request reuses the first one's system prompt: usage says how many prompt tokens were
    cached (OpenAI's prompt_tokens_details), /metrics counts them, and the answer is the one computed
    without reuse; --prompt-cache 0 turns it off."""
    with LiveServer(bundle, *args) as live:
        first, second = chat_twice(live, bundle)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert 10 < cached < second.usage.prompt_tokens
        assert live.metric("prompt_tokens_cached_total") == cached
        for answer, question in zip((first, second), ("Why is the sea salty?", "How deep is the sea?")):
            assert answer.choices[0].message.content == expected([SYSTEM, {"role": "user", "content": question}], 10)
    with LiveServer(bundle, *args, "--prompt-cache", "0") as live:
        off = chat_twice(live, bundle)
        assert [a.usage.prompt_tokens_details.cached_tokens for a in off] == [0, 0]
        assert [a.choices[0].message.content for a in off] == [first.choices[0].message.content,
                                                               second.choices[0].message.content]


def test_the_bundles_own_server_takes_prompt_cache_too(bundle):
    """python3 -m edgeforge_runtime.server (a device without edgeforge): --prompt-cache means the same."""
    import os

    env = dict(os.environ, PYTHONPATH=str(bundle / "runtime"))
    own = [sys.executable, "-m", "edgeforge_runtime.server", str(bundle), "--port", "0", "--parallel", "2"]
    with LiveServer(bundle, command=own, env=env) as live:
        assert chat_twice(live, bundle)[1].usage.prompt_tokens_details.cached_tokens > 10
    with LiveServer(bundle, command=own + ["--prompt-cache", "0", "--batch-invariant"], env=env) as live:
        assert chat_twice(live, bundle)[1].usage.prompt_tokens_details.cached_tokens == 0
        assert any("scratch row" in line or "batch-invariant (this CPU" in line for line in live.log), live.log
    proc = subprocess.run(own + ["--prompt-cache", "-1"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "--prompt-cache" in proc.stderr and "Traceback" not in proc.stderr


# ---- concurrency, the queue, shutdown ------------------------------------------------------------

def test_eight_concurrent_streams_give_the_single_answer(server, bundle):
    c = client(server)
    prompts = [f"Story number {i}:" for i in range(8)]

    def streamed(prompt):
        return "".join(ch.choices[0].text for ch in c.completions.create(
            model=model_id(bundle), prompt=prompt, max_tokens=24, temperature=0, stream=True) if ch.choices)

    single = [c.completions.create(model=model_id(bundle), prompt=p, max_tokens=24, temperature=0).choices[0].text
              for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == single


def test_sixteen_mixed_streams_get_their_answers_alone(bundle):
    """16 clients streaming at once into 8 batched slots: greedy, seeded top-p, stop strings and
    max_tokens side by side. The decoder samples every row itself and may run a token past a stop
    string; each stream must still be, text, finish reason and usage, what the request gets alone."""
    with LiveServer(bundle, "--parallel", "8", "--queue", "64", "--batch-invariant") as live:
        c = client(live)
        requests = []
        for i in range(16):
            kw = dict(model=model_id(bundle), prompt=f"Story number {i}:", max_tokens=6 + i)
            kw.update(temperature=1.0, top_p=0.9, seed=i) if i % 3 == 1 else kw.update(temperature=0)
            if i % 3 == 2:  # a stop string: a character from the second half of its answer alone
                text = c.completions.create(**kw).choices[0].text
                kw["stop"] = [next(ch for ch in text[len(text) // 2:] if ch != "\ufffd")]
            requests.append(kw)
        alone = [c.completions.create(**kw) for kw in requests]

        def streamed(kw):
            chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
            text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
            return text, [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1], chunks[-1].usage

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            together = list(pool.map(streamed, requests))
        for kw, one, (text, reason, usage) in zip(requests, alone, together):
            assert (text, reason) == (one.choices[0].text, one.choices[0].finish_reason), kw
            assert usage.completion_tokens == one.usage.completion_tokens <= kw["max_tokens"], kw
        assert any(one.choices[0].finish_reason == "stop" for one in alone[2::3])  # a stop string cut one
        assert live.metric("decode_batch_size_mean") > 1  # the streams shared decode steps
        assert live.metric("slots_busy") == 0


@pytest.mark.parametrize("seed", range(1, 5))
def test_random_clients_with_disconnects_get_their_answers_alone(bundle, seed):
    """Attack (Session 14): 24 requests from 12 client threads into 4 batched slots, at random moments: chat
    and completions, streamed or not, random max_tokens, prompts sharing beginnings, and a third of the
    streams dropped by their client after a few chunks. With --prompt-cache 0 (a reused position may be
    rounded otherwise: runtime/prefix.py) every request read to its end is, text and finish reason, what
    it gets alone; afterwards no slot is busy, nothing is queued, and the server still answers."""
    import random
    import threading

    rng = random.Random(seed)
    stems = ["Tell me about the sea", "Once upon a time there was", "Write a list of"]
    with LiveServer(bundle, "--parallel", "4", "--queue", "64", "--prompt-cache", "0", "--batch-invariant") as live:
        c = client(live)
        requests = []
        for i in range(24):
            text = f"{rng.choice(stems)} {' '.join(rng.choice(['red', 'blue', 'cats', 'ships', 'rain']) for _ in range(rng.randrange(0, 6)))}"
            kind, stream, n = rng.choice(["chat", "completion"]), rng.random() < 0.7, rng.randrange(1, 40)
            drop = rng.randrange(1, 4) if stream and rng.random() < 0.35 else None
            requests.append((kind, text, stream, n, drop, rng.random() * 0.3))

        def call(kind, text, stream, n, drop=None):
            kw = dict(model=model_id(bundle), max_tokens=n, temperature=0)
            if kind == "chat":
                made = c.chat.completions.create(messages=[{"role": "user", "content": text}], stream=stream, **kw)
            else:
                made = c.completions.create(prompt=text, stream=stream, **kw)
            if not stream:
                choice = made.choices[0]
                return (choice.message.content if kind == "chat" else choice.text), choice.finish_reason
            parts, reason = [], None
            for k, chunk in enumerate(made):
                if drop is not None and k >= drop:
                    made.close()  # the client goes away mid-stream
                    return None
                if chunk.choices:
                    choice = chunk.choices[0]
                    parts.append((choice.delta.content if kind == "chat" else choice.text) or "")
                    reason = choice.finish_reason or reason
            return "".join(parts), reason

        alone = [call(kind, text, False, n) for kind, text, _, n, _, _ in requests]
        got: dict[int, object] = {}
        lock = threading.Lock()

        def client_thread(ks):
            for k in ks:
                kind, text, stream, n, drop, delay = requests[k]
                time.sleep(delay)
                answer = call(kind, text, stream, n, drop)
                with lock:
                    got[k] = answer

        threads = [threading.Thread(target=client_thread, args=(list(range(j, 24, 12)),)) for j in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert sorted(got) == list(range(24))
        for k, (kind, text, stream, n, drop, _) in enumerate(requests):
            if drop is None:
                assert got[k] == alone[k], (k, requests[k])
        assert any(drop is not None for *_, drop, _ in requests)
        deadline = time.monotonic() + 30  # a dropped stream's slot is freed at the decoder's next boundary
        while live.metric("slots_busy") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert live.metric("slots_busy") == 0 and live.metric("queue_length") == 0
        assert call(*requests[0][:4]) == alone[0]  # still serving, and still the same answer
        assert live.proc.poll() is None


def test_full_queue_answers_429_with_retry_after(bundle):
    with LiveServer(bundle, "--parallel", "1", "--queue", "1") as live:
        body = {"model": model_id(bundle), "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: live.post("/v1/completions", body), range(16)))
        statuses = sorted(s for s, _, _ in results)
        assert set(statuses) <= {200, 429}, statuses
        assert 200 in statuses and 429 in statuses, statuses
        for status, answer, headers in results:
            if status == 429:
                assert answer["error"]["code"] == "rate_limit_exceeded" and int(headers["retry-after"]) >= 1
        assert live.metric("queue_length") == 0 and live.metric("slots_busy") == 0


def test_sigterm_exits_143_and_leaves_nothing(bundle):
    live = LiveServer(bundle)
    port = int(live.url.rsplit(":", 1)[1])
    assert live.get("/health")[0] == 200
    t0 = time.monotonic()
    assert live.terminate() == 143
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in "".join(live.log)
    with socket.socket() as probe:  # nothing listens there any more (TIME_WAIT of closed connections aside)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_help_has_an_example():
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "serve", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "edgeforge serve dist/" in proc.stdout and "--api-key" in proc.stdout
    json.dumps(proc.stdout)


def test_tvm_bundle_serves_concurrent_requests(tiny_model, tmp_path):
    """TVM bundles have no shared-model sibling: --parallel opens N engines, each used from its own thread."""
    pytest.importorskip("tvm", reason="the tvm extra (apache-tvm) is not installed")
    from edgeforge.runtime.session import open_session

    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "build", str(tiny_model("llama32")), "--quant",
                           "q4f32", "--target", "x86-cpu", "--backend", "tvm", "-o", str(tmp_path / "dist"),
                           "--no-smoke", "--no-quality", "serve test"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (tvm_bundle,) = [p for p in (tmp_path / "dist").iterdir() if p.is_dir()]
    session = open_session(tvm_bundle)
    prompts = [f"Story number {i}:" for i in range(4)]
    expected = [session.generate(session.encode(p), 20).text for p in prompts]
    with LiveServer(tvm_bundle, "--parallel", "2") as live:
        c = client(live)

        def streamed(prompt):
            return "".join(ch.choices[0].text for ch in c.completions.create(
                model=tvm_bundle.name, prompt=prompt, max_tokens=20, temperature=0, stream=True) if ch.choices)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert list(pool.map(streamed, prompts)) == expected
        assert live.terminate() == 143


def test_manifest_records_what_serving_installs(bundle):
    serve = json.loads((bundle / "manifest.json").read_text())["device_install"]["serve"]
    assert {"starlette", "uvicorn"} <= set(serve["packages"]) and serve["unmeasured"] == []
    assert 0 < serve["added_bytes"] <= serve["installed_bytes"] < 20e6
    assert all(p["installed_bytes"] > 0 for p in serve["packages"].values())
