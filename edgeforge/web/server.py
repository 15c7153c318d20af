"""serve_static(): serve a web bundle with what the page needs from the server.

- Cross-origin isolation (COOP `same-origin` + COEP `require-corp`): without it the browser gives
  no SharedArrayBuffer and onnxruntime-web's WASM runs on one thread.
- MIME types: `.wasm` as application/wasm (streaming compilation), `.mjs`/`.js` as JavaScript
  (module scripts are refused otherwise), `.json`, `.html`, `.css`; the model files as bytes.
- Only files manifest.json lists (plus manifest.json itself) are served: nothing else in the folder,
  no directory listings, no paths outside it.
- `Cache-Control: no-cache`: a rebuilt bundle at the same URL is never mixed with a cached old file.

Standard library only (http.server, threads): it also runs where starlette/uvicorn are not installed.
For a phone on the LAN, WebGPU, WebCrypto and threads need a secure context: pass certfile/keyfile
(HTTPS), or reach the server as localhost (adb reverse); see README "Phones".
"""

from __future__ import annotations

import http.server
import json
import logging
import posixpath
import socketserver
import ssl
import sys
import threading
import urllib.parse
from pathlib import Path

from ..errors import EdgeforgeError

logger = logging.getLogger(__name__)

ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
MIME_TYPES = {
    ".html": "text/html; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
    ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".wasm": "application/wasm", ".md": "text/markdown; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
CHUNK = 1 << 20


def served_files(bundle_dir: Path) -> dict[str, Path]:
    """URL path -> file for everything the bundle's manifest lists (and the manifest)."""
    bundle_dir = Path(bundle_dir).resolve()
    manifest_path = bundle_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = list(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EdgeforgeError(f"{manifest_path}: not a readable bundle manifest ({err})") from None
    if manifest.get("target", {}).get("run") != "browser":
        raise EdgeforgeError(f"{bundle_dir}: not a web bundle (target '{manifest.get('target', {}).get('name')}'); "
                             "build one with --target web")
    files = {"/manifest.json": manifest_path}
    for rel in listed:
        path = (bundle_dir / rel).resolve()
        if path.is_relative_to(bundle_dir) and path.is_file():
            files["/" + Path(rel).as_posix()] = path
    return files


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, Path] = {}
    server_version = "edgeforge-web"
    sys_version = ""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._serve(body=True)

    def do_HEAD(self):  # noqa: N802
        self._serve(body=False)

    def _serve(self, body: bool):
        path = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path))
        path = "/index.html" if path in ("/", ".") else path
        file = self.files.get(path)
        if file is None:
            return self._error(404, "not in this bundle")
        try:
            size = file.stat().st_size
            handle = open(file, "rb")  # noqa: SIM115 - closed below
        except OSError:
            return self._error(404, "unreadable")
        with handle:
            self.send_response(200)
            self._headers(MIME_TYPES.get(file.suffix, "application/octet-stream"), size)
            while body and (chunk := handle.read(CHUNK)):
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return

    def _headers(self, content_type: str, length: int):
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in ISOLATION_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()

    def _error(self, code: int, why: str):
        data = f"{code}: {why}\n".encode()
        self.send_response(code)
        self._headers("text/plain; charset=utf-8", len(data))
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, fmt, *args):  # requests at DEBUG, not on stderr
        logger.debug("web: " + fmt % args)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(bundle_dir, host: str = "127.0.0.1", port: int = 8000, certfile=None, keyfile=None):
    """A ready (bound) server for `bundle_dir`; port 0 picks a free one (server.server_address)."""
    handler = type("BundleHandler", (_Handler,), {"files": served_files(Path(bundle_dir))})
    try:
        server = _Server((host, port), handler)
    except OSError as err:
        raise EdgeforgeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    if certfile:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as err:
            server.server_close()
            raise EdgeforgeError(f"{certfile}: cannot use this certificate/key ({err})") from None
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    return server


def serve_static(bundle_dir, host: str = "127.0.0.1", port: int = 8000, certfile=None, keyfile=None) -> None:
    """Serve the web bundle until interrupted (what `edgeforge serve WEB_BUNDLE` runs)."""
    server = make_server(bundle_dir, host, port, certfile, keyfile)
    scheme = "https" if certfile else "http"
    logger.warning(f"serving {Path(bundle_dir).resolve().name} at {scheme}://{host}:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    finally:
        server.server_close()


class background_server:
    """`with background_server(bundle) as url:` a server on a free loopback port in a thread
    (smoke, bench and the tests)."""

    def __init__(self, bundle_dir, host: str = "127.0.0.1"):
        self.server = make_server(bundle_dir, host, 0)
        self.thread = threading.Thread(target=self.server.serve_forever, name="edgeforge-web", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def main(argv=None) -> int:
    """`python -m edgeforge.web.server BUNDLE [--host H] [--port P] [--certfile C --keyfile K]`
    (what `edgeforge serve WEB_BUNDLE` runs)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edgeforge.web.server", description="Serve a web bundle.",
                                 epilog="example: python -m edgeforge.web.server dist/smollm2-135m-q4f16-web-onnx --port 8000")
    ap.add_argument("bundle")
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 for the LAN (default: %(default)s)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--certfile", default=None, help="PEM certificate: serve HTTPS (phones need it on the LAN)")
    ap.add_argument("--keyfile", default=None, help="PEM private key of --certfile")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        serve_static(args.bundle, args.host, args.port, args.certfile, args.keyfile)
    except EdgeforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
