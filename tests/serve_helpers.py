"""A live `edgeforge serve` subprocess on 127.0.0.1 (a free port picked by the server: --port 0)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class LiveServer:
    def __init__(self, bundle: Path, *args: str, command=None, env=None, ready_timeout: float = 300):
        cmd = command or [sys.executable, "-m", "edgeforge.cli", "serve", str(bundle), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        self.url = self._wait_ready(ready_timeout)
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if m := re.search(r"serving \S+ on (http://\S+) ", line):
                return m.group(1)
        self.proc.kill()
        rest = self.proc.stderr.read() if self.proc.stderr else ""
        raise AssertionError(f"server did not start (rc {self.proc.wait()}): {''.join(self.log)}{rest}")

    def _read_rest(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    @property
    def base(self) -> str:
        return self.url + "/v1"

    def get(self, path: str, headers=None) -> tuple[int, dict | str, dict]:
        return self.request("GET", path, None, headers)

    def post(self, path: str, body, headers=None) -> tuple[int, dict | str, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})

    def request(self, method: str, path: str, data: bytes | None, headers=None):
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                status, raw, hdrs = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            status, raw, hdrs = err.code, err.read(), dict(err.headers)
        text = raw.decode()
        try:
            return status, json.loads(text), hdrs
        except ValueError:
            return status, text, hdrs

    def metric(self, name: str) -> float:
        _, text, _ = self.get("/metrics")
        m = re.search(rf"^edgeforge_{name} (\S+)$", text, re.M)
        assert m, f"no metric {name} in {text}"
        return float(m.group(1))

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def client(server: LiveServer, api_key: str = "none", timeout: float = 120, **kw):
    import openai

    return openai.OpenAI(base_url=server.base, api_key=api_key, max_retries=0, timeout=timeout, **kw)
