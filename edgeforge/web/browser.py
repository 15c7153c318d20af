"""Headless Chromium (the system's, driven by Playwright for Python) running a web bundle's page.

No browser is downloaded: Playwright launches EDGEFORGE_CHROMIUM or /usr/bin/chromium (Debian's
`chromium`, installed by `edgeforge toolchains install web`). The network stays closed (the page
talks only to our loopback server). WebGPU comes from a software adapter: Chromium's SwiftShader
Vulkan (--use-vulkan=swiftshader); the page checks navigator.gpu.requestAdapter() and a missing
adapter is an error, never a silent WASM run.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from ..errors import EdgeforgeError
from .server import background_server

logger = logging.getLogger(__name__)

CHROMIUM_ENV = "EDGEFORGE_CHROMIUM"
BASE_ARGS = [
    "--no-sandbox",  # root in a container: Chromium's sandbox cannot start
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-dev-shm-usage",  # /dev/shm is small in containers; large ArrayBuffers need room
]
WEBGPU_ARGS = ["--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-vulkan=swiftshader",
               "--use-angle=swiftshader", "--ignore-gpu-blocklist"]
EPS = ("wasm", "webgpu")


def chromium_path() -> str:
    path = os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        raise EdgeforgeError(f"{path}: no Chromium here; run `edgeforge toolchains install web` (Debian's chromium) "
                             f"or set {CHROMIUM_ENV}")
    return path


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise EdgeforgeError("running a web bundle needs Playwright for Python: pip install 'edgeforge[web]' "
                             "(it drives the system Chromium; no browser download)") from None
    return sync_playwright


class Page:
    """`with Page(bundle, query) as page:` Chromium showing the bundle's index.html?query, served on
    loopback; page.wait_result() returns window.edgeforgeResult."""

    def __init__(self, bundle: Path, query: str = "", webgpu: bool = False, timeout_s: float = 600):
        self.bundle, self.query, self.webgpu, self.timeout_s = Path(bundle), query, webgpu, timeout_s
        self.console: list[str] = []

    def __enter__(self):
        self._server = background_server(self.bundle)
        url = self._server.__enter__()
        try:
            self._pw_context = _playwright()()
            self._pw = self._pw_context.__enter__()
            args = BASE_ARGS + (WEBGPU_ARGS if self.webgpu else [])
            self.browser = self._pw.chromium.launch(executable_path=chromium_path(), headless=True, args=args)
            self.page = self.browser.new_page(viewport={"width": 412, "height": 860})  # a phone's width
            self.page.on("console", self._on_console)
            self.page.goto(f"{url}index.html{'?' + self.query if self.query else ''}")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def _on_console(self, msg):
        text = msg.text
        self.console.append(text)
        if text.startswith("[edgeforge] "):
            logger.info(f"  [chromium] {text[12:]}")

    def wait_result(self) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            result = self.page.evaluate("window.edgeforgeResult || null")
            if result is not None:
                return result
            self.page.wait_for_timeout(250)
        raise EdgeforgeError(f"the page did not finish within {self.timeout_s:.0f} s (last: "
                             f"{(self.console or ['nothing logged'])[-1]})")

    def __exit__(self, *exc):
        for step in (lambda: self.browser.close(), lambda: self._pw_context.__exit__(None, None, None)):
            try:
                step()
            except Exception:  # noqa: BLE001 - tearing down after an error: keep the first error
                pass
        self._server.__exit__(None, None, None)


def run_page(bundle: Path, mode: str, ep: str, extra: dict | None = None, timeout_s: float = 600) -> dict:
    """Run the page in `mode` (smoke | bench) on `ep` (wasm | webgpu); returns its result."""
    if ep not in EPS:
        raise EdgeforgeError(f"--ep {ep}: expected one of {', '.join(EPS)}")
    query = "&".join(f"{k}={v}" for k, v in {"mode": mode, "ep": ep, **(extra or {})}.items())
    with Page(bundle, query, webgpu=ep == "webgpu", timeout_s=timeout_s) as page:
        return page.wait_result()
