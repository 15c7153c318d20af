"""The TVM runtime a bundle carries to its device: TVM's runtime library, without its compiler.

A compiled module needs libtvm_runtime (+ libtvm_runtime_cuda for CUDA), not libtvm_compiler.so
(~260 MB) that the apache-tvm wheel installs, nor TVM's Python package (which needs numpy):
runtime/tvm_engine.py drives the module through tvm_ffi and the runtime's global functions. So a
TVM bundle for Linux holds under runtime/tvm/ the libraries of the compiler's own TVM version (one
version from build to device: version skew is the most common failure of the tools we replace)
for the target's CPU architecture (this machine's, or the apache-tvm wheel of the same version for
aarch64), and TVM's `_version.py`, which the engine checks against the artifact. Those files are
checksummed like every other bundle file. What pip installs on the device is tvm_ffi
(`PIP_DEPENDENCIES`) and the bundle runtime's libraries (tokenizers, jinja2; no numpy).

macOS targets (a .tar of objects that a Mac links) keep the apache-tvm requirement: their device
build links TVM's runtime itself.
"""

from __future__ import annotations

import shutil
import zipfile
from importlib import metadata
from pathlib import Path

from ... import toolchains
from ...errors import EdgeforgeError
from ...runtime.hostcheck import cpu_arch, host_arch

# What the engine needs besides libtvm_runtime: tvm_ffi (and its one dependency). TVM's Python
# package is not imported on the device (runtime/tvm_engine.py), so neither numpy nor ml_dtypes.
PIP_DEPENDENCIES = ("apache-tvm-ffi", "typing_extensions")
# The one Python file carried: the version the engine compares with the artifact's compiler.
VERSION_FILE = "_version.py"
# The CPUs a runtime-only TVM is bundled for, with the ELF machine its libraries must have.
ELF_MACHINES = {"x86_64": 62, "aarch64": 183}


def runtime_spec(tt) -> dict | None:
    """What runtime/tvm/ holds for a TvmTarget, or None when the device provides TVM itself."""
    import tvm

    if tt.os != "linux" or tt.export_kind != "so":
        return None
    arch = cpu_arch(tt.arch)
    if arch not in ELF_MACHINES:
        raise EdgeforgeError(f"target '{tt.name}': no runtime-only TVM for CPU arch {tt.arch!r} "
                             f"(known: {sorted(ELF_MACHINES)})")
    # libtvm_runtime_extra (disco, multi-GPU) is never loaded in runtime-only mode: not shipped
    libs = ["tvm_runtime"] + (["tvm_runtime_cuda"] if tt.is_cuda else [])
    return {"package": "tvm", "version": tvm.__version__, "arch": arch, "libs": libs}


def pip_requirements(spec: dict | None) -> dict[str, str]:
    """The device's pip requirements for the TVM runtime, pinned to this machine's versions."""
    import tvm

    if spec is None:
        return {"apache-tvm": tvm.__version__}
    return {dist: metadata.version(dist) for dist in PIP_DEPENDENCIES}


def copy_runtime(spec: dict, dest: Path) -> int:
    """Write the TVM runtime of `spec` into dest/tvm (dest = the bundle's runtime/ folder): lib/ and
    _version.py. Returns the bytes written."""
    import tvm

    pkg = Path(tvm.__file__).resolve().parent
    if tvm.__version__ != spec["version"]:
        raise EdgeforgeError(f"the artifact was compiled with TVM {spec['version']} but this machine has "
                             f"{tvm.__version__}: recompile it here")
    out = Path(dest) / "tvm"
    (out / "lib").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pkg / VERSION_FILE, out / VERSION_FILE)
    total = (out / VERSION_FILE).stat().st_size
    for name, data in _libraries(spec, pkg):
        if _elf_machine(data) != ELF_MACHINES[spec["arch"]]:
            raise EdgeforgeError(f"{name} for the device is not an {spec['arch']} library (ELF machine "
                                 f"{_elf_machine(data)}): refusing to bundle it")
        (out / "lib" / name).write_bytes(data)
        total += len(data)
    return total


def _elf_machine(data: bytes) -> int | None:
    return int.from_bytes(data[18:20], "little") if data[:4] == b"\x7fELF" else None


def _libraries(spec: dict, pkg: Path):
    names = [f"lib{lib}.so" for lib in spec["libs"]]
    if spec["arch"] == host_arch():
        for name in names:
            path = pkg / "lib" / name
            if not path.is_file():
                raise EdgeforgeError(f"{path}: missing from this machine's TVM (the bundle's device runtime needs it)")
            yield name, path.read_bytes()
        return
    wheel = toolchains.arch_wheel("apache-tvm", spec["version"], spec["arch"])
    with zipfile.ZipFile(wheel) as zf:
        members = set(zf.namelist())
        for name in names:
            member = f"tvm/lib/{name}"
            if member not in members:
                raise EdgeforgeError(f"{wheel}: has no {member} (the bundle's device runtime needs it)")
            yield name, zf.read(member)
