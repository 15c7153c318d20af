"""Toolchains for targets this build machine cannot run natively: aarch64 under qemu, Vulkan on lavapipe.

Both are built once by shell scripts (scripts/setup-arm64.sh, scripts/setup-vulkan.sh) into
`<edgeforge cache>/toolchains/`; this module finds them, runs the scripts on request, and builds the
command lines and environments the backends, bundles and tests use:

    root = ensure_arm64()                          # or arm64_root() -> None when not built
    cmd, env = qemu_python_command(["smoke.py", "--json"], extra_pythonpath=[bundle / "runtime"])
    subprocess.run(cmd, env=env, cwd=bundle)

    python, env = ensure_vulkan()                  # or vulkan_env() -> None when not built
    subprocess.run([python, "smoke.py"], env=env)  # onnxruntime-webgpu on Mesa lavapipe

`edgeforge doctor` and `edgeforge targets` ask these functions (bundle/doctor.py) what is built.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import EdgeforgeError
from .cache import cache_dir
from .nvrtc import Nvrtc

SCRIPTS_DIR = Path(__file__).parent / "_scripts"  # a link to scripts/ in a checkout, copied into the wheel
ARM64_PYTHON = "usr/bin/python3.11"
ARM64_SITE = "opt/edgeforge/site"
# Raspberry Pi 5's core; also a CPU both qemu 7.2 and LLVM know by this name.
DEFAULT_QEMU_CPU = "cortex-a76"
QEMU = "qemu-aarch64-static"

logger = logging.getLogger(__name__)  # setup progress (the scripts' "[setup-...]" lines) at INFO


def toolchains_dir() -> Path:
    return cache_dir() / "toolchains"


# ---------------------------------------------------------------------------------------------
# arm64 (qemu-user)
# ---------------------------------------------------------------------------------------------


def arm64_root(ensure: bool = False) -> Path | None:
    """The ready arm64 root (Debian bookworm + runtime wheels), or None when it is not built.

    With ensure=True a missing root is built (see ensure_arm64) instead of returning None.
    """
    if ensure:
        return ensure_arm64()
    if _script_says_ready("setup-arm64.sh"):
        return toolchains_dir() / "arm64-root"
    return None


def ensure_arm64() -> Path:
    """Build the arm64 root if needed (a few minutes the first time, instant later) and return it.

    Raises EdgeforgeError naming what is missing (root rights, apt, network) when it cannot.
    """
    out = _run_setup("setup-arm64.sh")
    root = Path(out.strip().splitlines()[-1])
    if not (root / ARM64_PYTHON).exists():
        raise EdgeforgeError(f"scripts/setup-arm64.sh finished but {root / ARM64_PYTHON} does not exist")
    return root


def qemu_python_command(
    script_args: list[str],
    extra_pythonpath: list[str | os.PathLike] = (),
    cpu: str | None = None,
    root: Path | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that run `python3.11 *script_args` as an aarch64 process under qemu-user.

    Host paths work as they are inside the emulated process (qemu -L only redirects paths that
    exist inside the root, such as /usr/lib and /etc). `extra_pythonpath` comes before the root's
    site folder. `cpu` is a qemu CPU name (default cortex-a76; "max" enables SVE/SME; use
    qemu_cpu_for() to map a target's mcpu). The TVM in the root is runtime-only
    (TVM_USE_RUNTIME_LIB=1). Raises EdgeforgeError if the root is not built.
    """
    root = Path(root) if root else arm64_root()
    if root is None:
        raise EdgeforgeError("the arm64 root is not built: run scripts/setup-arm64.sh (as root) or `edgeforge doctor`")
    if shutil.which(QEMU) is None:
        raise EdgeforgeError(f"{QEMU} not found: apt-get install qemu-user-static (or run scripts/setup-arm64.sh)")
    cpu = cpu or DEFAULT_QEMU_CPU
    prefix = _cpu_view(root, cpu)
    cmd = [QEMU, "-cpu", cpu, "-L", str(prefix), str(root / ARM64_PYTHON), *map(str, script_args)]
    env = _clean_env()
    paths = [str(Path(p).absolute()) for p in extra_pythonpath] + [str(root / ARM64_SITE)]
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        PYTHONNOUSERSITE="1",
        TVM_USE_RUNTIME_LIB="1",
        # TVM's thread pool spins while waiting for its workers; emulated, that spinning costs more
        # than the second thread gains (measured ~10 s per SmolLM2 token with 2 threads under load).
        TVM_NUM_THREADS=os.environ.get("EDGEFORGE_QEMU_THREADS", "1"),
        LC_ALL="C.UTF-8",
    )
    return cmd, env


def arch_wheels_dir(arch: str) -> Path:
    """Where wheels for another CPU architecture are cached (scripts/setup-arm64.sh fills the aarch64
    one; its Python is 3.11, so binary wheels there are cp311)."""
    if arch != "aarch64":
        raise EdgeforgeError(f"no wheel cache for {arch} (only aarch64 wheels are downloaded)")
    return toolchains_dir() / "wheels" / "arm64-cp311"


def wheel_key(dist: str, version: str) -> str:
    """How arch_wheels() names a wheel: the normalized distribution name (as in wheel file names) and
    the version, e.g. "ml_dtypes==0.6.0" for ml-dtypes 0.6.0."""
    return f"{re.sub(r'[-_.]+', '_', dist).lower()}=={version}"


def arch_wheels(arch: str) -> dict[str, Path]:
    """{wheel_key: wheel} of the cached wheels for `arch` (newest file per name)."""
    folder = arch_wheels_dir(arch)
    found = {}
    for wheel in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        found[wheel_key(*wheel.name.split("-")[:2])] = wheel
    return found


def arch_wheel(dist: str, version: str, arch: str) -> Path:
    """The wheel of dist==version for `arch`, from the cache, downloaded from PyPI once when absent."""
    key = wheel_key(dist, version)
    found = ensure_arch_wheels([(dist, version)], arch)
    if key not in found:
        raise EdgeforgeError(f"no {arch} wheel of {dist}=={version} in {arch_wheels_dir(arch)} and downloading it "
                             f"failed: {found.get('error', 'no matching wheel')}")
    return found[key]


def ensure_arch_wheels(specs: list[tuple[str, str]], arch: str) -> dict:
    """{wheel_key: wheel} for `specs` (pairs of name, exact version) on `arch`: cached ones, and the
    missing ones downloaded in one pip call (a failure, e.g. offline, leaves them out and its last
    line under "error")."""
    have = arch_wheels(arch)
    missing = [f"{d}=={v}" for d, v in specs if wheel_key(d, v) not in have]
    error = None
    if missing:
        logger.info(f"downloading {len(missing)} {arch} wheel(s) into the cache: {', '.join(missing)}")
        folder = arch_wheels_dir(arch)
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(folder),
               "--retries", "1", "--timeout", "15",
               "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none",
               "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_27_aarch64",
               "--platform", "manylinux_2_17_aarch64", "--platform", "manylinux2014_aarch64", "--platform", "any",
               *missing]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            error = (proc.stderr.strip().splitlines() or ["pip download failed"])[-1]
        have = arch_wheels(arch)
    found = {k: have[k] for k in (wheel_key(d, v) for d, v in specs) if k in have}
    if error:
        found["error"] = error
    return found


@functools.lru_cache(maxsize=None)
def _qemu_cpus() -> frozenset[str]:
    text = subprocess.run([QEMU, "-cpu", "help"], capture_output=True, text=True).stdout
    return frozenset(line.split()[0] for line in text.splitlines()[1:] if line.strip())


def qemu_cpu_for(mcpu: str | None) -> str:
    """The qemu CPU to emulate a target's LLVM `mcpu` (the common Arm cores share names).

    Cores qemu does not know (cortex-a78, apple-m1, ...) get "max", which has every extension,
    so code built for them runs; it then says nothing about whether the real core has them.
    """
    if not mcpu:
        return DEFAULT_QEMU_CPU
    if shutil.which(QEMU) is None:
        raise EdgeforgeError(f"{QEMU} not found: apt-get install qemu-user-static (or run scripts/setup-arm64.sh)")
    return mcpu if mcpu in _qemu_cpus() else "max"


def _clean_env() -> dict[str, str]:
    """The host environment minus what would point the guest at host (x86) libraries or a venv."""
    drop = {"LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("QEMU_")}


# What /proc/cpuinfo says for each core we emulate: onnxruntime picks its kernels from these
# Features (asimddp: int8 dot products, so accuracy_level 4's int8 path; fphp/asimdhp: float16
# arithmetic), so the emulated program must see the core qemu runs, not the A76 it was built on.
# (Features, CPU variant, CPU part, CPU revision), from the cores' Linux /proc/cpuinfo.
_A76 = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
        "0x4", "0xd0b", "1")
CPUINFO = {
    "cortex-a76": _A76,
    "cortex-a72": ("fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid", "0x0", "0xd08", "3"),
    "cortex-a53": ("fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid", "0x0", "0xd03", "4"),
}


# Real (empty) folders in a CPU view, not links: the guest resolves links itself (os.path.realpath),
# and a link at /root or /tmp would turn host paths under them (bundles, temp copies) into paths
# inside the root that do not exist. Empty, they pass such paths through to the host, as the root does.
OWN_IN_VIEW = ("root", "tmp", "home")


def _cpu_view(root: Path, cpu: str) -> Path:
    """The folder qemu -L serves for `cpu`: the root itself for the default core; for another, a
    folder of links to the root's top-level entries with its own proc/cpuinfo for that core (made
    once, next to the root). A core with no entry in CPUINFO (`max`) sees the A76's."""
    if cpu not in CPUINFO or cpu == DEFAULT_QEMU_CPU:
        _sync_cpuinfo(root)
        return root
    view = root.parent / f"{root.name}-view-{cpu}"
    if not (view / "proc").is_dir():
        tmp = root.parent / f".{view.name}.tmp-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "proc").mkdir(parents=True)
            for entry in root.iterdir():
                if entry.name in OWN_IN_VIEW:
                    (tmp / entry.name).mkdir()
                elif entry.name != "proc":
                    (tmp / entry.name).symlink_to(entry)
        except OSError as err:  # never run as another core than asked: say why instead
            shutil.rmtree(tmp, ignore_errors=True)
            raise EdgeforgeError(f"cannot make the {cpu} view of the arm64 root at {view} ({err.strerror}): "
                                 "the emulated program must see that core's /proc/cpuinfo") from None
        try:
            os.replace(tmp, view)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    _sync_cpuinfo(view, cpu)
    return view


def _sync_cpuinfo(root: Path, cpu: str = DEFAULT_QEMU_CPU) -> None:
    """Keep ROOT/proc/cpuinfo at one (ARM) entry per host CPU, describing `cpu`.

    qemu 7.2 shows aarch64 programs the host's x86 /proc/cpuinfo, on which onnxruntime's cpuinfo
    library segfaults; qemu -L serves ROOT/proc/cpuinfo instead. The CPU topology under /sys is the
    host's, so the entry count must follow the host (the cache may move between machines).
    """
    path = root / "proc" / "cpuinfo"
    count = os.cpu_count() or 1
    features, variant, part, revision = CPUINFO.get(cpu, _A76)
    entry = (
        "processor\t: {i}\nBogoMIPS\t: 108.00\n"
        f"Features\t: {features}\n"
        f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\n"
        f"CPU revision\t: {revision}\n\n"
    )
    text = "".join(entry.format(i=i) for i in range(count))
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    tmp = path.with_name(f".cpuinfo.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        # A root built by another user (read-only here): any ARM entries avoid the crash; the
        # count only refines what onnxruntime believes about cores.
        pass


# ---------------------------------------------------------------------------------------------
# Vulkan (Mesa lavapipe + onnxruntime-webgpu venv)
# ---------------------------------------------------------------------------------------------


def vulkan_dir() -> Path:
    return toolchains_dir() / "vulkan"


def vulkan_env(ensure: bool = False) -> tuple[Path, dict[str, str]] | None:
    """(python of the onnxruntime-webgpu venv, env that selects lavapipe), or None when not built.

    The env puts Mesa 25's libvulkan_lvp.so and the Vulkan loader on LD_LIBRARY_PATH and names the
    lavapipe ICD json only, so Dawn (WebGPU) sees exactly one adapter: the software GPU.
    """
    if ensure:
        return ensure_vulkan()
    if not _script_says_ready("setup-vulkan.sh"):
        return None
    return _vulkan_paths(vulkan_dir())


def ensure_vulkan() -> tuple[Path, dict[str, str]]:
    """Build lavapipe + the webgpu venv if needed and return (python, env) as vulkan_env()."""
    out = _run_setup("setup-vulkan.sh")
    base = Path(out.strip().splitlines()[-1])
    python, env = _vulkan_paths(base)
    if not python.exists():
        raise EdgeforgeError(f"scripts/setup-vulkan.sh finished but {python} does not exist")
    return python, env


def _vulkan_paths(base: Path) -> tuple[Path, dict[str, str]]:
    mesa = base / "mesa"
    icd = mesa / "lvp_icd.json"
    libdirs = [mesa / "usr/lib/x86_64-linux-gnu", mesa / "usr/lib"]
    env = _clean_env()
    old = os.environ.get("LD_LIBRARY_PATH")
    env.update(
        LD_LIBRARY_PATH=os.pathsep.join([str(d) for d in libdirs] + ([old] if old else [])),
        VK_ICD_FILENAMES=str(icd),  # older loaders
        VK_DRIVER_FILES=str(icd),  # loaders >= 1.3.207
        PYTHONNOUSERSITE="1",
    )
    return base / "venv" / "bin" / "python", env


# ---------------------------------------------------------------------------------------------
# Web (Debian's chromium + the pinned npm packages the page ships)
# ---------------------------------------------------------------------------------------------


def ensure_web() -> Path:
    """Install chromium (apt) and the npm packages if needed (scripts/setup-web.sh); returns the
    folder whose node_modules/ the web bundles copy their vendor files from."""
    out = _run_setup("setup-web.sh")
    return Path(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# CUDA compilers from PyPI (no GPU, no system CUDA needed)
# ---------------------------------------------------------------------------------------------

# The CUDA compiler wheels per CUDA major version, pinned: `cuda` bundles are built with CUDA 13
# (drivers >= 580), jetson-orin with CUDA 12 (JetPack 6). Each installs into <cache>/toolchains/cuda<major>/
# once. CUDA 13: nvcc + ptxas, cicc (nvvm), the runtime and crt headers, libcu++ (cccl) that kernels
# include. CUDA 12: nvidia-cuda-nvcc-cu12 holds ptxas but no nvcc (measured, 12.6 to 12.9), so NVRTC
# compiles instead (edgeforge/nvrtc.py; it embeds ptxas), with the runtime and cccl headers.
CUDA_WHEELS = {
    13: ["nvidia-cuda-nvcc==13.0.88", "nvidia-nvvm==13.0.88", "nvidia-cuda-runtime==13.0.96",
         "nvidia-cuda-crt==13.0.88", "nvidia-cuda-cccl==13.0.85"],
    12: ["nvidia-cuda-nvrtc-cu12==12.6.85", "nvidia-cuda-runtime-cu12==12.6.77", "nvidia-cuda-cccl-cu12==12.6.77"],
}


@dataclasses.dataclass(frozen=True)
class CudaCompiler:
    """How CUDA kernels of one major version get compiled here: `nvcc` (a fatbin for every arch, plus
    PTX) or `nvrtc` (libnvrtc through ctypes: one cubin for one arch)."""

    kind: str  # "nvcc" | "nvrtc"
    major: int
    path: Path  # nvcc, or libnvrtc.so
    env: dict  # environment additions while compiling (nvcc)
    includes: tuple  # header folders (nvrtc)

    def version(self) -> str:
        if self.kind == "nvcc":  # its last line names the build: "Build cuda_13.0.r13.0/compiler..."
            text = _first_line([str(self.path), "--version"])
            return text.splitlines()[-1] if text else "unavailable"
        major, minor = Nvrtc(self.path, list(self.includes)).version()
        return f"NVRTC {major}.{minor} (nvidia-cuda-nvrtc-cu{major} wheel)"


def nvcc_major(nvcc: str | os.PathLike) -> int | None:
    out = _first_line([str(nvcc), "--version"]) or ""
    m = re.search(r"(?:release |V)(\d+)\.(\d+)", out)
    return int(m.group(1)) if m else None


def cuda_dir(major: int) -> Path:
    return toolchains_dir() / f"cuda{major}"


def _wheel_compiler(major: int) -> CudaCompiler | None:
    """The compiler the cached wheels of `major` provide, or None when they are not installed."""
    root = cuda_dir(major)
    if not (root / "READY").exists():
        return None
    # the header wheels unpack next to nvcc (cu13) or in sibling folders (cu12): name them all
    includes = tuple(sorted({str(p.parent) for p in root.glob("nvidia/*/include/cuda_runtime.h")} |
                            {str(p.parents[2]) for p in root.glob("nvidia/*/include/cccl/cuda/std/cstdint")} |
                            {str(p.parents[2]) for p in root.glob("nvidia/*/include/cuda/std/cstdint")}))
    if nvcc := sorted(root.glob("nvidia/*/bin/nvcc")):
        env = {"PATH": f"{nvcc[0].parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "NVCC_PREPEND_FLAGS": " ".join(f"-I{d}" for d in includes)}
        return CudaCompiler("nvcc", major, nvcc[0], env, includes)
    if nvrtc := sorted(root.glob("nvidia/cuda_nvrtc/lib/libnvrtc.so.*")):
        return CudaCompiler("nvrtc", major, nvrtc[0], {}, includes)
    return None


def cuda_toolchain(major: int, install: bool = False) -> CudaCompiler | None:
    """The CUDA `major` compiler: a system nvcc of that major first, else the PyPI wheels under the
    cache (installed when `install`). None when neither is there."""
    system = shutil.which("nvcc")
    if system and nvcc_major(system) == major:
        return CudaCompiler("nvcc", major, Path(system), {}, ())
    found = _wheel_compiler(major)
    if found is None and install:
        found = _install_cuda_wheels(major)
    return found


def _install_cuda_wheels(major: int) -> CudaCompiler:
    if major not in CUDA_WHEELS:
        raise EdgeforgeError(f"no CUDA {major} toolchain is known (known: {sorted(CUDA_WHEELS)})")
    final = cuda_dir(major)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-install")
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"installing CUDA {major} compilers from PyPI ({', '.join(CUDA_WHEELS[major])}) into {final} ...")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:", "--target",
           str(tmp), *CUDA_WHEELS[major]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EdgeforgeError(f"installing the CUDA {major} compilers failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    (tmp / "READY").write_text(json.dumps({"wheels": CUDA_WHEELS[major]}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    found = _wheel_compiler(major)
    if found is None:
        raise EdgeforgeError(f"the CUDA {major} wheels in {final} hold neither nvcc nor NVRTC")
    return found


def install(name: str) -> str:
    """`edgeforge toolchains install NAME`: arm64, vulkan, cuda (13) or cuda12. Idempotent, cached."""
    if name == "arm64":
        return str(ensure_arm64())
    if name == "vulkan":
        return str(ensure_vulkan()[0])
    if name == "web":
        return str(ensure_web())
    if name in ("cuda", "cuda13", "cuda12"):
        major = 12 if name == "cuda12" else 13
        return str(cuda_toolchain(major, install=True).path)
    raise EdgeforgeError(f"unknown toolchain {name!r}: arm64, vulkan, web, cuda (CUDA 13) or cuda12")


# ---------------------------------------------------------------------------------------------
# running the setup scripts
# ---------------------------------------------------------------------------------------------


def _script(name: str) -> Path:
    path = SCRIPTS_DIR / name
    if not path.exists():
        raise EdgeforgeError(f"{path} not found: toolchain setup needs an edgeforge source checkout (scripts/{name})")
    return path


def _script_env() -> dict[str, str]:
    # The scripts download wheels with pip; this interpreter (the venv) surely has pip.
    env = dict(os.environ, PYTHON=sys.executable, EDGEFORGE_CACHE=str(cache_dir()))
    return env


def _script_says_ready(name: str) -> bool:
    try:
        path = _script(name)
    except EdgeforgeError:
        return False
    proc = subprocess.run(["bash", str(path), "--check"], env=_script_env(), capture_output=True)
    return proc.returncode == 0


def _run_setup(name: str) -> str:
    """Run a setup script, logging its progress lines (stderr) as they come; return its stdout."""
    proc = subprocess.Popen(
        ["bash", str(_script(name))],
        env=_script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tail: list[str] = []
    for line in proc.stderr:
        line = line.rstrip()
        if line.startswith("[setup-"):
            logger.info(line)
        tail = (tail + [line])[-40:]
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise EdgeforgeError(f"scripts/{name} failed (exit {proc.returncode}): {_failure_reason(tail)}")
    return out


def _failure_reason(tail: list[str]) -> str:
    """One line: the script's own error, plus the last line of the tool output before it."""
    marks = [i for i, line in enumerate(tail) if "] error: " in line]
    if not marks:
        return next((line for line in reversed(tail) if line.strip()), "no output")
    reason = tail[marks[-1]].split("] error: ", 1)[1].replace(" (its last lines are above)", "")
    before = [line.strip() for line in tail[: marks[-1]] if line.strip() and not line.startswith("[setup-")]
    if not before:
        return reason
    # apt and debootstrap end with a summary ("Some index files failed ..."); the cause is earlier.
    causes = [line for line in before if re.search(r"Could not|Failed to fetch|Failed getting|Unable to", line)]
    return f"{reason}; {(causes or before)[-1]}"


# ---------------------------------------------------------------------------------------------
# helpers for what this machine has (edgeforge doctor asks; bundle/doctor.py)
# ---------------------------------------------------------------------------------------------


def _first_line(cmd: list[str], timeout: float = 20) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text if proc.returncode == 0 and text else None


def vulkan_devices(env: dict[str, str] | None = None, python: str | os.PathLike | None = None) -> list[dict]:
    """Vulkan physical devices seen with `env` (default: this process's environment).

    Enumerated in a child process (a broken driver may crash) by edgeforge/vulkan_probe.py, which
    uses only ctypes and the Vulkan loader (libvulkan.so.1). Empty when there is no loader/driver.
    """
    probe_script = Path(__file__).with_name("vulkan_probe.py")
    try:
        proc = subprocess.run(
            [str(python or sys.executable), str(probe_script)],
            env=env if env is not None else dict(os.environ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        return json.loads(proc.stdout).get("devices", []) if proc.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return []

