"""Load test: `edgeforge serve` next to llama.cpp's `llama-server` on the same model, on loopback.

    python bench/serve_load.py --bundle dist/smollm2-135m-q4f16-x86-cpu-onnx --threads 1
    # writes bench/results/serve-load.json; bench/report.py renders it into BENCHMARKS.md ("Serving")

For each server and each concurrency (1, 4, 16 clients): every client sends streamed chat completions
(greedy, the same max_tokens, prompts from one list) one after another until the level's request count
is done. Measured: generated tokens a second over the level's wall time (all clients together), time to
first token p50/p99, errors, and the server's peak RSS (VmHWM, polled) over the whole run, next to the
weights' bytes. Bounded: a fixed number of requests, each with a timeout; loopback only.

Same model at the same size: the edgeforge bundle (SmolLM2-135M q4f16, 5.45 bits a weight) and
llama.cpp's Q4_0 GGUF (5.35 bits a weight; bench/prep.py makes it with llama-quantize from the same
float weights), both servers with the same slots (--parallel / -np) and threads.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from run import weight_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a story about a lighthouse keeper.", "Explain how a bicycle works.", "Describe a busy market.",
    "Write a letter to a friend about the sea.", "Explain why the sky is blue.", "Describe a forest in winter.",
    "Write a poem about a train.", "Explain how bread is made.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess; its peak RSS is polled (VmHWM) until it stops."""

    def __init__(self, name: str, cmd: list[str], port: int, model: str, env=None):
        self.name, self.cmd, self.port, self.model = name, cmd, port, model
        self.log = open(f"/tmp/serve_load-{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._poll_rss, daemon=True).start()

    def _poll_rss(self) -> None:
        status = Path(f"/proc/{self.proc.pid}/status")
        while not self._stop.is_set() and self.proc.poll() is None:
            try:
                m = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
                if m:
                    self.peak_rss = max(self.peak_rss, int(m.group(1)) * 1024)
            except OSError:
                pass
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: see {self.log.name}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready after {timeout} s")

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def one_request(port: int, model: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    """One streamed chat completion: time to first token, tokens (usage, else content chunks), seconds."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}"}
        ttft, chunks, usage, done = None, 0, None, False
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens")
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
        if not done:
            return {"error": "stream ended without [DONE]"}
        return {"ttft": ttft, "tokens": usage if usage is not None else chunks, "seconds": time.perf_counter() - t0}
    except (OSError, ValueError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        conn.close()


def load_level(server: ServerProcess, clients: int, requests: int, max_tokens: int, timeout: float) -> tuple:
    """One round of a level: (every request's result, the round's wall seconds)."""
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    lock, results = threading.Lock(), []

    def client(k: int) -> None:
        for prompt in jobs[k::clients]:
            r = one_request(server.port, server.model, prompt, max_tokens, timeout)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return results, time.perf_counter() - t0


def summarize(clients: int, rounds: list[tuple]) -> dict:
    """A level over its rounds: tokens over the rounds' summed wall time, TTFT quantiles of every request."""
    results = [r for got, _ in rounds for r in got]
    wall = sum(w for _, w in rounds)
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "rounds": len(rounds),
            "round_tok_s": [round(sum(r.get("tokens", 0) for r in got) / w, 1) for got, w in rounds],
            "errors": len(results) - len(ok),
            "error_kinds": sorted({r["error"] for r in results if "error" in r}),
            "tokens": tokens, "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1) if wall else 0.0,
            "ttft_p50_ms": round(1000 * _quantile(ttfts, 0.5), 1) if ttfts else None,
            "ttft_p99_ms": round(1000 * _quantile(ttfts, 0.99), 1) if ttfts else None}


def _quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]


def edgeforge_server(bundle: Path, slots: int, threads: int, ctx: int, batch: bool = True,
                     name: str | None = None) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "edgeforge.cli", "serve", str(bundle), "--port", str(port), "--parallel", str(slots),
           "--ctx", str(ctx), "--queue", "1000", "-q", "--batch" if batch else "--no-batch"]
    env = dict(os.environ, EDGEFORGE_THREADS=str(threads), PYTHONPATH=str(ROOT))
    return ServerProcess(name or ("edgeforge" if batch else "edgeforge-unbatched"), cmd, port, bundle.name, env)


def llama_server(gguf: Path, slots: int, threads: int, ctx: int) -> ServerProcess:
    exe = peers.llama_tool("llama-server")
    if exe is None:
        raise SystemExit("llama-server is not built: python bench/peers.py llama.cpp")
    port = free_port()
    cmd = [str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
           "-c", str(ctx * slots), "-t", str(threads), "-tb", str(threads), "--no-webui", "--log-disable"]
    return ServerProcess("llama-server", cmd, port, gguf.stem)


def default_gguf() -> Path:
    import prep
    from edgeforge.models import fetch_model

    return prep.llama_quant(fetch_model("smollm2-135m"), "smollm2-135m", "Q4_0")


def run(args) -> dict:
    bundle = Path(args.bundle).resolve()
    gguf = None
    if "llama-server" in args.servers:
        gguf = Path(args.gguf) if args.gguf else default_gguf()
    models = {"edgeforge": bundle, "edgeforge-unbatched": bundle, "llama-server": gguf}
    makers = {"edgeforge": lambda: edgeforge_server(bundle, args.slots, args.threads, args.ctx),
              "edgeforge-unbatched": lambda: edgeforge_server(bundle, args.slots, args.threads, args.ctx, batch=False),
              "llama-server": lambda: llama_server(gguf, args.slots, args.threads, args.ctx)}
    names = list(args.servers)
    for also in args.also:  # NAME=BUNDLE: another edgeforge bundle served the same way, e.g. another size
        name, _, path = also.partition("=")
        other = Path(path).resolve()
        models[name], names = other, names + [name]
        makers[name] = lambda other=other, name=name: edgeforge_server(other, args.slots, args.threads, args.ctx,
                                                                       name=name)
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": shlex.join(sys.argv),
           "max_tokens": args.max_tokens, "slots": args.slots, "threads": args.threads, "ctx": args.ctx,
           "rounds": args.rounds, "load_average": os.getloadavg()[0], "servers": {}}
    servers = {}
    try:
        for name in names:
            servers[name] = makers[name]()
            servers[name].wait_ready()
            one_request(servers[name].port, servers[name].model, PROMPTS[0], 4, args.timeout)  # warm up
        levels = {name: [] for name in servers}
        # Interleaved (each round of a level: every server in turn): on a shared machine, load that comes and
        # goes then falls on every server alike rather than on whichever happened to run at the time.
        for clients in args.clients:
            requests = max(args.min_requests, args.requests_per_client * clients)
            rounds = {name: [] for name in servers}
            for _ in range(args.rounds):
                for name, server in servers.items():
                    rounds[name].append(load_level(server, clients, requests, args.max_tokens, args.timeout))
            for name in servers:
                levels[name].append(summarize(clients, rounds[name]))
                print(f"[serve_load] {name} {levels[name][-1]}", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    for name, server in servers.items():
        model = models[name]
        size = model.stat().st_size if name == "llama-server" else weight_bytes(model)
        out["servers"][name] = {"model": str(model), "weights_bytes": size, "peak_rss_bytes": server.peak_rss,
                                "levels": levels[name]}
    out["load_average_end"] = os.getloadavg()[0]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="an edgeforge bundle folder (x86-cpu ONNX)")
    ap.add_argument("--gguf", default=None, help="llama.cpp's model (default: SmolLM2 Q4_0 made by bench/prep.py)")
    ap.add_argument("--servers", nargs="+", default=["edgeforge", "llama-server"],
                    choices=["edgeforge", "edgeforge-unbatched", "llama-server"],
                    help="edgeforge-unbatched: edgeforge serve --no-batch (one decode call per request)")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=BUNDLE",
                    help="another edgeforge bundle served as server NAME (e.g. one of llama.cpp's file size)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each level, the servers in turn each round")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=4, help="--parallel for edgeforge, -np for llama-server")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512, help="context per slot")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a request may take")
    ap.add_argument("-o", "--output", default=str(ROOT / "bench" / "results" / "serve-load.json"),
                    help="write the result JSON here (bench/report.py renders it into BENCHMARKS.md)")
    args = ap.parse_args(argv)
    if not args.bundle:
        ap.error("--bundle is required")
    text = json.dumps(run(args), indent=1)
    Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
