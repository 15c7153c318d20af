"""`edgeforge smoke`: verify a bundle here, then run its own smoke.py where it can run.

Where: this machine's Python (host CPU, CUDA), the WebGPU/lavapipe Python (vulkan), the arm64 root
under qemu (--emulate) or a device over ssh (--ssh). The bundle's smoke.py loads only the bundle's
runtime copy, so this checks exactly what ships. Exit codes: 0 PASS, 1 FAIL, 2 unusable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .. import toolchains
from ..errors import EdgeforgeError
from ..runtime.bundle_errors import BundleError
from ..runtime.hostcheck import check_can_run
from ..runtime.manifest_check import clean_stale_temps, owned_temp_dir, verified_copy
from ..targets import CPU_RE
from . import archive

# Which Vulkan a vulkan bundle's smoke test runs on: "lavapipe" (default: Mesa's software driver, built
# by scripts/setup-vulkan.sh, the same everywhere) or "system" (this machine's own driver, e.g. a GPU's,
# through this Python's onnxruntime-webgpu).
VULKAN_ENV = "EDGEFORGE_VULKAN"

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def opened_bundle(spec: Path):
    """A bundle folder for `spec` (a folder, or an archive extracted into a temp folder)."""
    spec = Path(spec)
    if archive.is_archive(spec):
        parent = tempfile.gettempdir()
        clean_stale_temps(Path(parent))  # extractions of runs killed with SIGKILL
        with owned_temp_dir(f".edgeforge-smoke.tmp-{os.getpid()}-", parent) as tmp:
            yield archive.extract(spec, Path(tmp))
        return
    if not spec.is_dir():
        raise EdgeforgeError(f"{spec}: no such bundle folder or archive")
    yield spec


@contextlib.contextmanager
def verified(bundle: Path, trust=None):
    """(manifest, private verified copy of the bundle), the copy removed afterwards: what smoke runs
    is what was checked, whatever happens to the bundle meanwhile."""
    try:
        manifest, copy = verified_copy(bundle, trust)
    except BundleError as err:
        raise EdgeforgeError(str(err)) from None
    try:
        yield manifest, copy
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _target_cpu(manifest: dict) -> str | None:
    """The manifest's target core, if it is a plain core name (a bundle's manifest is checksummed, not
    trusted: the name goes on qemu's command line)."""
    cpu = manifest["target"].get("cpu")
    if cpu is None:
        return None  # bundles from before targets named their core: the default (cortex-a76)
    if not isinstance(cpu, str) or not CPU_RE.fullmatch(cpu):
        raise EdgeforgeError(f"manifest.json: target cpu {str(cpu)[:60]!r} is not a CPU core name")
    return cpu


def python_for(manifest: dict, emulate: bool) -> tuple[list[str], dict]:
    """The command prefix and environment of a Python that can run this bundle on this machine."""
    run = manifest["target"].get("run", "host")
    if emulate:
        if manifest["target"].get("arch") != "aarch64" or manifest["target"].get("os") != "linux":
            raise EdgeforgeError(f"--emulate: bundle target '{manifest['target']['name']}' is not aarch64 Linux")
        root = toolchains.ensure_arm64()  # builds the arm64 root the first time (minutes)
        # as the device's own core: onnxruntime picks different kernels (or none: float16 on a
        # Cortex-A72 is SIGILL) by what the CPU has
        cpu = toolchains.qemu_cpu_for(_target_cpu(manifest))
        logger.info(f"emulating a {cpu} (qemu-aarch64)")
        return toolchains.qemu_python_command([], root=root, cpu=cpu)
    try:
        check_can_run(manifest)
    except BundleError as err:
        raise EdgeforgeError(str(err)) from None
    if run == "vulkan" or manifest.get("device", "").startswith(("webgpu", "vulkan")):
        if _vulkan_choice() == "system":
            _check_system_webgpu()
            return [sys.executable], dict(os.environ)  # the machine's own Vulkan driver: a real GPU
        python, env = toolchains.ensure_vulkan()  # onnxruntime-webgpu venv + Mesa lavapipe
        return [str(python)], env
    return [sys.executable], dict(os.environ)


def _vulkan_choice() -> str:
    value = os.environ.get(VULKAN_ENV, "lavapipe")
    if value not in ("system", "lavapipe"):
        raise EdgeforgeError(f"${VULKAN_ENV}={value!r}: expected 'system' (this machine's Vulkan driver) or 'lavapipe'")
    return value


def _check_system_webgpu() -> None:
    """$EDGEFORGE_VULKAN=system runs smoke.py with this Python: its onnxruntime must have the WebGPU EP
    and the machine a Vulkan device, else the verdict would be about another device or none."""
    try:
        import onnxruntime
    except ImportError:
        raise EdgeforgeError(f"${VULKAN_ENV}=system: this Python has no onnxruntime: pip install onnxruntime-webgpu") from None
    if "WebGpuExecutionProvider" not in onnxruntime.get_available_providers():
        raise EdgeforgeError(f"${VULKAN_ENV}=system: this Python's onnxruntime {onnxruntime.__version__} has no "
                             "WebGPU execution provider: pip install onnxruntime-webgpu (in place of onnxruntime)")
    if not toolchains.vulkan_devices():
        raise EdgeforgeError(f"${VULKAN_ENV}=system: no Vulkan device on this machine (no loader libvulkan.so.1, "
                             "or no driver); unset it to run on Mesa lavapipe")


def parse_result(code: int, out: str, err: str, where: str) -> tuple[int, dict]:
    if code < 0:
        sig = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise EdgeforgeError(f"smoke.py on {where} crashed with {sig} (last words: {last})")
    try:
        result = json.loads(out)
    except ValueError:
        tail = (err.strip().splitlines() or out.strip().splitlines() or ["no output"])[-1]
        raise EdgeforgeError(f"smoke.py on {where} exited {code} without a result: {tail}") from None
    if code not in (0, 1, 2):
        raise EdgeforgeError(f"smoke.py on {where} crashed (exit {code}): {(err.strip().splitlines() or [''])[-1]}")
    return code, result


def run_local(bundle: Path, python: list[str], env: dict, where: str,
              timeout: float | None = None, smoke_args: tuple[str, ...] = ()) -> tuple[int, dict]:
    """Run BUNDLE/smoke.py --json; its progress lines (stderr, one per golden prompt) are logged as they come."""
    cmd = [*python, str(bundle.resolve() / "smoke.py"), "--json", *smoke_args]
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError as err:
        raise EdgeforgeError(f"cannot start {python[0]}: {err}") from None
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()  # stdout is read aside so that a large result can never block the child
    err_lines = []
    try:
        for line in proc.stderr:
            err_lines.append(line)
            logger.info(f"  [{where}] {line.rstrip()}")
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EdgeforgeError(f"smoke.py on {where} did not finish within {timeout} s") from None
    finally:  # interrupted or terminated: the child goes too (it may hold an extracted archive)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join()
    return parse_result(code, "".join(out), "".join(err_lines), where)


def smoke(spec: Path, emulate: bool = False, ssh: str | None = None, port: int = 22, identity: str | None = None,
          remote_python: str = "python3", known_hosts: str | None = None,
          prompts: int | None = None, trust=None, eps: tuple[str, ...] | None = None) -> tuple[int, dict]:
    smoke_args = ("--prompts", str(prompts)) if prompts else ()
    with opened_bundle(spec) as opened, verified(opened, trust) as (manifest, bundle):
        # verified by edgeforge's own code, before any of the bundle's runs
        logger.info(f"checksums ok: {len(manifest['files'])} files" + (", signature ok" if trust else ""))
        from ..web import run as web_run

        if web_run.is_web(manifest):  # its page, in headless Chromium (WASM and WebGPU)
            if emulate or ssh:
                raise EdgeforgeError("a web bundle's smoke runs in headless Chromium here: --emulate and --ssh "
                                     "do not apply (open its index.html?mode=smoke on the phone)")
            return web_run.smoke(bundle, manifest, eps or web_run.EPS, prompts=prompts)
        if eps:
            raise EdgeforgeError("--ep applies to web bundles only")
        if ssh:
            from .remote import smoke_over_ssh

            code, out, err = smoke_over_ssh(bundle, ssh, port, identity, remote_python, known_hosts,
                                            smoke_args=smoke_args)
            return parse_result(code, out, err, ssh)
        python, env = python_for(manifest, emulate)
        where = "qemu-aarch64" if emulate else "this machine"
        return run_local(bundle, python, env, where, smoke_args=smoke_args)
