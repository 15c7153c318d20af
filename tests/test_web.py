"""The `web` target: a static-site bundle whose page runs the model with onnxruntime-web, checked in
the system's headless Chromium (WASM, and WebGPU on Chromium's SwiftShader adapter).

Browser tests are `slow` and `web`: they need `edgeforge toolchains install web` (chromium + the
pinned npm packages; `make toolchains` runs it) and Playwright for Python (the `web` extra)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bundle_helpers import copy_bundle

from edgeforge.errors import EdgeforgeError

EDGEFORGE = [sys.executable, "-m", "edgeforge.cli"]
web = [pytest.mark.slow, pytest.mark.web]


def _edgeforge(*args, timeout=1800):
    return subprocess.run([*EDGEFORGE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _build(model, scheme, out) -> Path:
    proc = _edgeforge("build", model, "--quant", scheme, "--target", "web", "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (bundle,) = json.loads(proc.stdout)["bundles"]
    return Path(bundle["path"])


def _smoke(bundle, *args):
    proc = _edgeforge("smoke", bundle, "--json", *args)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else {}), proc.stderr


# ---- the static server: headers and MIME types (no browser) ---------------------------------------

def _fake_site(root: Path) -> Path:
    files = {"index.html": b"<html></html>", "web/app.mjs": b"export {};", "web/vendor/x.wasm": b"\0asm\1\0\0\0",
             "artifact/model.onnx.data": b"\1\2\3"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "secret.txt").write_text("not listed")
    manifest = {"format": "edgeforge-bundle", "target": {"name": "web", "run": "browser"},
                "files": {rel: {"sha256": "", "size": len(d)} for rel, d in files.items()}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _get(url, method="GET"):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as res:
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_server_sends_isolation_headers_and_mime_types(tmp_path):
    from edgeforge.web.server import background_server

    with background_server(_fake_site(tmp_path)) as url:
        expect = {"": "text/html", "index.html": "text/html", "web/app.mjs": "text/javascript",
                  "web/vendor/x.wasm": "application/wasm", "manifest.json": "application/json",
                  "artifact/model.onnx.data": "application/octet-stream"}
        for path, mime in expect.items():
            status, headers, body = _get(url + path)
            assert status == 200, path
            assert headers["Content-Type"].startswith(mime), (path, headers["Content-Type"])
            assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
            assert int(headers["Content-Length"]) == len(body)
        assert _get(url + "web/vendor/x.wasm")[2] == b"\0asm\1\0\0\0"
        assert _get(url + "web/vendor/x.wasm", "HEAD")[2] == b""
        # only what the manifest lists: no unlisted files, no way out of the folder, no listings
        for bad in ("secret.txt", "../" * 5 + "etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "web/", "web/vendor"):
            assert _get(url + bad)[0] == 404, bad


def test_server_refuses_a_bundle_that_is_not_web(tmp_path):
    from edgeforge.web.server import make_server

    site = _fake_site(tmp_path)
    manifest = json.loads((site / "manifest.json").read_text())
    manifest["target"]["run"] = "host"
    (site / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeforgeError, match="not a web bundle"):
        make_server(site, "127.0.0.1", 0)


def test_too_large_model_refused_by_name(tmp_path):
    from edgeforge.web.layout import check_fits

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 5 << 30}}))
    with pytest.raises(EdgeforgeError, match=r"5.00 GiB .* too large for target 'web'.*4 GiB \(wasm32\)"):
        check_fits(tmp_path, "web")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1 << 30}}))
    check_fits(tmp_path, "web")  # a 1B model's q4 weights fit


def test_setup_script_installs_the_pinned_npm_packages():
    """scripts/setup-web.sh and edgeforge.web.NPM_PACKAGES name the same versions (the bundle's
    manifest records the latter; assets.node_modules refuses a toolchain that differs)."""
    import re

    from edgeforge.web import NPM_PACKAGES

    text = (Path(__file__).parents[1] / "scripts" / "setup-web.sh").read_text()
    listed = re.search(r"^NPM_PACKAGES=\((.*)\)$", text, re.M).group(1).split()
    assert dict(item.rsplit("@", 1) for item in listed) == NPM_PACKAGES


def test_web_target_preset():
    from edgeforge.targets import get_target

    t = get_target("web")
    assert (t.backends, t.run, t.onnx["execution_provider"], t.onnx["compute_dtype"]) == (("onnx",), "browser", "web", "float32")
    for phone in ("android-arm64", "iphone"):
        assert "web" in get_target(phone).description  # they point phone users to the web target


# ---- in headless Chromium ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_web_bundle(tiny_model, tmp_path_factory):
    return _build(tiny_model("llama32"), "q4f32", tmp_path_factory.mktemp("web-dist"))


@pytest.mark.slow
@pytest.mark.web
def test_tiny_web_bundle_layout(tiny_web_bundle):
    manifest = json.loads((tiny_web_bundle / "manifest.json").read_text())
    files = set(manifest["files"])
    assert {"index.html", "web/engine.mjs", "web/vendor/ort-wasm-simd-threaded.asyncify.wasm",
            "artifact/model.onnx.data", "golden.json", "tokenizer/tokenizer.json"} <= files
    assert not any(f.startswith("runtime/") or f in ("smoke.py", "requirements.txt") for f in files)
    assert manifest["runtime_requirements"]["onnxruntime-web"] == "1.31.1"
    assert manifest["target"]["run"] == "browser" and "browser" in manifest["device_requirements"]
    golden = json.loads((tiny_web_bundle / "golden.json").read_text())
    assert set(golden["tolerance"]["per_ep"]) == {"wasm", "webgpu"}


@pytest.mark.slow
@pytest.mark.web
def test_tiny_web_smoke_passes_on_wasm_and_webgpu(tiny_web_bundle):
    code, result, err = _smoke(tiny_web_bundle)
    assert code == 0, err[-2000:]
    runs = {r["ep"]: r for r in result["runs"]}
    assert set(runs) == {"wasm", "webgpu"}
    for ep, r in runs.items():
        assert r["status"] == "PASS" and r["files_checked"] == len(json.loads((tiny_web_bundle / "manifest.json").read_text())["files"])
        assert r["tokens_agree"] >= r["tokens_total"] - 1, ep
    assert runs["wasm"]["max_logit_err"] < 1e-3  # float32 WASM: the reference's numbers
    assert runs["webgpu"]["device"].startswith("webgpu (")  # a real adapter, named


@pytest.mark.slow
@pytest.mark.web
def test_llama2_shape_web_smoke_on_wasm(tiny_model, tmp_path):
    """The other tokenizer family (sentencepiece-style tokenizer.json, no chat template) and an untied
    head with multi-head attention, through the page's tokenizer and engine."""
    bundle = _build(tiny_model("llama2"), "q4f32", tmp_path)
    code, result, err = _smoke(bundle, "--ep", "wasm")
    assert code == 0, (err[-2000:], result)
    (r,) = result["runs"]
    assert r["status"] == "PASS" and r["tokens_agree"] == r["tokens_total"]


@pytest.mark.slow
@pytest.mark.web
def test_unquantized_embedding_rows_on_wasm(tiny_model, tmp_path):
    """q0f32: the page reads dense float32 embedding rows (the quantized path is the other tests')."""
    bundle = _build(tiny_model("llama32"), "q0f32", tmp_path)
    assert json.loads((bundle / "artifact" / "artifact.json").read_text())["onnx"]["embedding"]["kind"] == "dense"
    code, result, err = _smoke(bundle, "--ep", "wasm")
    assert code == 0, (err[-2000:], result)
    assert result["runs"][0]["max_logit_err"] < 1e-4


@pytest.mark.slow
@pytest.mark.web
def test_page_refuses_a_tampered_data_file(tiny_web_bundle, tmp_path):
    from edgeforge.web.browser import run_page

    bad = copy_bundle(tiny_web_bundle, tmp_path / "bad")
    data = bad / "artifact" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    data.write_bytes(bytes(raw))
    # the page itself (not edgeforge's Python check) must refuse it, by name
    result = run_page(bad, "smoke", "wasm", timeout_s=300)
    assert result["status"] == "ERROR"
    assert "artifact/model.onnx.data: sha256 does not match manifest.json" in result["error"]
    # and in chat mode, before any model runs
    result = run_page(bad, "chat", "wasm", timeout_s=300)
    assert "model.onnx.data: sha256 does not match" in result["error"]
    code, _, err = _smoke(bad)
    assert code == 2 and "model.onnx.data" in err


@pytest.mark.slow
@pytest.mark.web
def test_web_bench_reports_pp_and_tg(tiny_web_bundle):
    proc = _edgeforge("bench", tiny_web_bundle, "-p", "16", "-n", "8", "-r", "1", "--ep", "wasm", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads(proc.stdout)
    assert [r["test"] for r in records] == ["pp16", "tg8"]
    assert all(r["avg_ts"] > 0 and r["device"].startswith("wasm") for r in records)


# ---- SmolLM2 --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_web_bundle(smollm2_gguf, tmp_path_factory):
    return _build(smollm2_gguf, "q4f16", tmp_path_factory.mktemp("web-smollm2"))


@pytest.mark.slow
@pytest.mark.web
def test_smollm2_web_smoke_passes_on_wasm(smollm2_web_bundle):
    code, result, err = _smoke(smollm2_web_bundle, "--ep", "wasm")
    assert code == 0, (err[-2000:], result)
    (r,) = result["runs"]
    assert r["status"] == "PASS" and r["prompts_checked"] == r["prompts_total"] == 3
    assert r["tokens_agree"] == r["tokens_total"] and r["max_logit_err"] < 1e-3  # float32, same weights


@pytest.mark.slow
@pytest.mark.web
def test_smollm2_web_smoke_passes_on_webgpu(smollm2_web_bundle):
    # One golden prompt: Chromium's WebGPU adapter here is SwiftShader, a CPU emulation of a GPU that
    # runs SmolLM2 at ~16 s a token on 2 cores (docs/notes/web.md); a prompt is ~40 runs.
    code, result, err = _smoke(smollm2_web_bundle, "--ep", "webgpu", "--prompts", "1")
    assert code == 0, (err[-2000:], result)
    (r,) = result["runs"]
    assert r["status"] == "PASS" and r["device"].startswith("webgpu (") and r["prompts_checked"] == 1
    assert r["tokens_agree"] == r["tokens_total"]


@pytest.mark.slow
@pytest.mark.web
def test_smollm2_chat_page_answers_paris(smollm2_web_bundle, tmp_path):
    """The chat page, as a user sees it: type the question, press Send, read the answer; the PNG
    goes to this test's folder."""
    from edgeforge.web.browser import Page

    with Page(smollm2_web_bundle, "ep=wasm&max_tokens=24", timeout_s=600) as page:
        p = page.page
        p.wait_for_selector("#prompt:not([disabled])", timeout=300_000)
        p.fill("#prompt", "What is the capital of France?")
        p.click("#send")
        p.wait_for_selector("#prompt:not([disabled])", timeout=300_000)  # the answer is complete
        answer = p.inner_text(".msg.assistant")
        shot = tmp_path / "chat-paris.png"
        p.screenshot(path=str(shot), full_page=True)
        status = p.inner_text("#ep")
    assert "Paris" in answer, answer
    assert "wasm" in status
    assert shot.stat().st_size > 10_000
