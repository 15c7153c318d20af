"""`edgeforge serve` with the real SmolLM2-135M q4f16 x86 ONNX bundle and the real `openai` client:
the answer contains "Paris" (plain and streamed), 8 concurrent streams give the single answer, a
client that leaves mid-stream frees its engine, SIGTERM mid-stream drains and exits 143.

The bundle is built once per session (about 3 min on 2 cores); set EDGEFORGE_SMOLLM2_DIST to a folder
holding smollm2-135m-q4f16-x86-cpu-onnx to reuse one."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client (dev extra) is not installed")

from serve_helpers import LiveServer, client  # noqa: E402

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-q4f16-x86-cpu-onnx"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def bundle(smollm2_gguf, tmp_path_factory) -> Path:
    reuse = os.environ.get("EDGEFORGE_SMOLLM2_DIST")
    if reuse and (Path(reuse) / NAME).is_dir():
        return Path(reuse) / NAME
    out = tmp_path_factory.mktemp("serve-smollm2")
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "build", str(smollm2_gguf), "--quant", "q4f16",
                           "--target", "x86-cpu", "--backend", "onnx", "-o", str(out), "--no-smoke",
                           "--no-quality", "serve tests"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = [p for p in out.iterdir() if p.is_dir()]
    return built


@pytest.fixture(scope="module")
def server(bundle):
    with LiveServer(bundle, "--parallel", "2", "--batch-invariant") as live:
        yield live


def test_chat_answers_paris(server, bundle):
    answer = client(server).chat.completions.create(model=bundle.name, messages=FRANCE, max_tokens=24, temperature=0)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop" and answer.usage.prompt_tokens > 10


def test_streamed_chat_answers_paris(server, bundle):
    chunks = list(client(server).chat.completions.create(model=bundle.name, messages=FRANCE, max_tokens=24,
                                                         temperature=0, stream=True))
    assert len(chunks) > 3  # text came in pieces, not at the end
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_eight_concurrent_streams_give_the_single_answer(server, bundle):
    c = client(server)
    questions = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello.",
                 "Name a fruit.", "What is the sun?", "Name an ocean.", "Who wrote Hamlet?"]

    def ask(q, stream):
        kw = dict(model=bundle.name, messages=[{"role": "user", "content": q}], max_tokens=20, temperature=0)
        if not stream:
            return c.chat.completions.create(**kw).choices[0].message.content
        return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                       if ch.choices)

    single = [ask(q, False) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda q: ask(q, True), questions))
    assert together == single  # --batch-invariant: a lone request takes the batch's kernels too
    assert "Paris" in together[0]
    (line,) = [entry for entry in server.log if entry.startswith("serving ")]
    assert "a lone sequence next to a scratch row" in line or "batch-invariant (this CPU" in line, line


def test_disconnect_mid_stream_frees_the_engine(server, bundle):
    before = server.metric("cancelled_total")
    stream = client(server).chat.completions.create(model=bundle.name, messages=STORY, max_tokens=2000,
                                                    temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    t0 = time.monotonic()
    while server.metric("cancelled_total") == before and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert server.metric("cancelled_total") == before + 1
    assert server.metric("slots_busy") == 0
    assert time.monotonic() - t0 < 5  # freed between two tokens, not after 2000 of them


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_engine(server, bundle):
    before = server.metric("cancelled_total")
    with pytest.raises(openai.APITimeoutError):
        client(server, timeout=1.5).chat.completions.create(model=bundle.name, messages=STORY, max_tokens=2000,
                                                            temperature=0)
    t0 = time.monotonic()
    while server.metric("cancelled_total") == before and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert server.metric("cancelled_total") == before + 1 and server.metric("slots_busy") == 0


def test_sigterm_mid_stream_drains_then_exits_143(bundle):
    live = LiveServer(bundle, "--drain", "60")
    got: dict = {}

    def read():
        stream = client(live).chat.completions.create(model=bundle.name, messages=FRANCE, max_tokens=24,
                                                      temperature=0, stream=True)
        chunks = []
        for ch in stream:
            chunks.append(ch)
            if len(chunks) == 2:
                got["started"] = time.monotonic()
        got["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        got["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    reader = threading.Thread(target=read)
    reader.start()
    t0 = time.monotonic()
    while "started" not in got and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    assert "started" in got
    assert live.terminate(timeout=90) == 143
    reader.join(30)
    assert "Paris" in got["text"] and got["finish"] == "stop"  # the request in flight was answered in full
    assert "Traceback" not in "".join(live.log)


def test_sigterm_drain_is_bounded(bundle):
    live = LiveServer(bundle, "--drain", "1")
    errors = []

    def read():
        try:
            for _ in client(live).chat.completions.create(model=bundle.name, messages=STORY, max_tokens=4000,
                                                          temperature=0, stream=True):
                pass
        except Exception as err:  # noqa: BLE001 - the server went away mid-stream, as it should
            errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(3)
    t0 = time.monotonic()
    assert live.terminate(timeout=60) == 143
    assert time.monotonic() - t0 < 10
    reader.join(30)
    assert not reader.is_alive()
