"""A server inside qemu-aarch64 (the arm64 root, as a Raspberry Pi 5 runs it) answering the host: a tiny
rpi5 ONNX bundle served by the bundle's own runtime (python3 -m edgeforge_runtime.server, no edgeforge
installed there), with starlette and uvicorn's aarch64 wheels (pure Python) unzipped next to it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client (dev extra) is not installed")

from serve_helpers import LiveServer, client  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.arm]


def server_site(dest: Path) -> Path:
    """starlette, uvicorn and what they need, from their aarch64 wheels (cached; downloaded once)."""
    from edgeforge import toolchains
    from edgeforge.bundle.device_install import SERVE_PACKAGES, dependency_closure

    specs = list(dependency_closure(SERVE_PACKAGES).items())
    wheels = toolchains.ensure_arch_wheels(specs, "aarch64")
    for name, version in specs:
        wheel = wheels.get(toolchains.wheel_key(name, version))
        assert wheel is not None, f"no aarch64 wheel of {name}=={version}: {wheels.get('error')}"
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(dest)
    return dest


def test_serve_inside_qemu_answers_the_host(tiny_model, tmp_path):
    from edgeforge import toolchains

    root = toolchains.ensure_arm64()
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "build", str(tiny_model("llama32")), "--quant",
                           "q4f32", "--target", "rpi5", "--backend", "onnx", "-o", str(out), "--no-smoke",
                           "--no-quality", "serve test"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (bundle,) = [p for p in out.iterdir() if p.is_dir()]
    site = server_site(tmp_path / "site")
    cmd, env = toolchains.qemu_python_command(["-m", "edgeforge_runtime.server", str(bundle), "--port", "0"],
                                              extra_pythonpath=[bundle / "runtime", site], root=root)
    with LiveServer(bundle, command=cmd, env=env, ready_timeout=900) as live:
        answer = client(live).chat.completions.create(
            model=bundle.name, messages=[{"role": "user", "content": "Tell me about the sea."}], max_tokens=4,
            temperature=0)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert 1 <= answer.usage.completion_tokens <= 4
        assert live.get("/health")[1]["status"] == "ok"
        assert live.terminate(timeout=120) == 143
