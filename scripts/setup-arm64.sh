#!/usr/bin/env bash
# Build (once) an arm64 Debian root with Python 3.11 and edgeforge's bundle runtime (numpy,
# tokenizers, jinja2, onnxruntime, tvm_ffi; TVM bundles bring their own runtime-only TVM), so
# aarch64 bundles can run under qemu-user on an x86-64 build machine.
#
#   scripts/setup-arm64.sh            build if needed, then print the root's path (last line)
#   scripts/setup-arm64.sh --check    exit 0 if the root is ready, 1 if not; changes nothing
#   scripts/setup-arm64.sh --force    rebuild even if the stamp says it is ready
#
# Idempotent and safe on a fresh Debian bookworm CI machine as root. Everything lands under
# ${EDGEFORGE_CACHE:-~/.cache/edgeforge}/toolchains/. The root is built in a temporary folder and
# renamed at the end, and a stamp with every version decides whether a rerun has anything to do.
# Concurrent runs serialize on a lock file, so several test processes may call this at once.
set -euo pipefail

SUITE=bookworm
MIRROR="${EDGEFORGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PYVER=3.11
PYVER_MINOR=${PYVER#3.}
# Pinned to the versions of the x86-64 compiler environment: a bundle's requirements.txt pins
# these, so the emulated device must run exactly them.
WHEELS=(
    numpy==2.4.6
    tokenizers==0.23.3
    jinja2==3.1.6
    markupsafe==3.0.4
    onnxruntime==1.32.0
    apache-tvm-ffi==0.1.15.post2
    ml_dtypes==0.6.0
    typing_extensions==4.16.0
    packaging==26.3
)
# Downloaded into the wheel cache but not installed: TVM bundles carry a runtime-only TVM for their CPU
# (edgeforge/backends/tvm/device_runtime.py takes its aarch64 libraries from this wheel), so the
# emulated device has no TVM of its own and a smoke test proves the bundle's.
DOWNLOAD_ONLY=(
    apache-tvm==0.27.0.post1
)
STAMP_TEXT="edgeforge-arm64-root v2 suite=$SUITE python=$PYVER wheels=${WHEELS[*]} download=${DOWNLOAD_ONLY[*]}"

CACHE_BASE="${EDGEFORGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeforge}"
TOOLS="$CACHE_BASE/toolchains"
ROOT="$TOOLS/arm64-root"
STAMP="$ROOT/.edgeforge-stamp"
WHEEL_CACHE="$TOOLS/wheels/arm64-cp311"
PYTHON="${PYTHON:-python3}"

SETUP_NAME=setup-arm64
. "$(dirname "${BASH_SOURCE[0]}")/lib-setup.sh"

# Ready = the stamp matches these versions and the host tools exist (a cache restored onto a fresh
# CI machine still needs qemu and the cross compiler installed).
is_ready() {
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]] &&
        command -v qemu-aarch64-static >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null
}

setup_start "arm64 root ready" "$ROOT" "$@"

# --- host tools: cross compiler, qemu-user, debootstrap (apt, only what is missing) -------------
ensure_host_tools() {
    local missing=()
    command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
    command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
    command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
    [[ -x /usr/sbin/debootstrap ]] || command -v debootstrap >/dev/null || missing+=(debootstrap)
    "$PYTHON" -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    local sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null && sudo -n true 2>/dev/null && sudo="sudo -n" ||
            die "missing ${missing[*]}; run as root or: apt-get install ${missing[*]}"
    fi
    log "apt-get install ${missing[*]}"
    # Other processes may hold the dpkg lock (CI images, parallel setups): wait for it.
    local apt=($sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q)
    if ! "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >&2; then
        "${apt[@]}" update >&2
        "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >&2 ||
            die "apt-get install ${missing[*]} failed"
    fi
}

# --- the arm64 root: debootstrap's first stage, then unpack every .deb by hand ------------------
make_root() {
    local dir=$1
    [[ $(id -u) -eq 0 ]] || die "debootstrap needs root to build $ROOT (run this script as root once)"
    log "debootstrap --foreign --arch=arm64 $SUITE (first stage only)"
    PATH="$PATH:/usr/sbin:/sbin" debootstrap --foreign --arch=arm64 --variant=minbase \
        --include=python3,libstdc++6 "$SUITE" "$dir" "$MIRROR" >"$dir.debootstrap.log" 2>&1 || {
        tail -n 15 "$dir.debootstrap.log" >&2
        die "debootstrap --foreign --arch=arm64 $SUITE from $MIRROR failed (its last lines are above)"
    }
    # The second stage runs the arm64 maintainer scripts in a chroot, which needs binfmt_misc
    # (absent here). Running Python needs files only, so unpacking each package is enough.
    local debs=("$dir"/var/cache/apt/archives/*.deb)
    log "unpacking ${#debs[@]} packages"
    for deb in "${debs[@]}"; do dpkg-deb -x "$deb" "$dir"; done
    rm -f "${debs[@]}" "$dir.debootstrap.log"
    [[ -e "$dir/usr/bin/python$PYVER" ]] || die "no usr/bin/python$PYVER in the arm64 root after unpacking"
}

# --- aarch64 wheels from PyPI, unzipped into ROOT/opt/edgeforge/site ---------------------------
install_wheels() {
    local dir=$1 site="$1/opt/edgeforge/site"
    mkdir -p "$WHEEL_CACHE" "$site"
    log "pip download (aarch64, cp311): ${WHEELS[*]}"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEEL_CACHE" \
        --python-version "$PYVER" --implementation cp --abi cp311 --abi abi3 --abi none \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
        --platform manylinux_2_26_aarch64 --platform manylinux_2_17_aarch64 \
        --platform manylinux2014_aarch64 --platform any \
        "${WHEELS[@]}" "${DOWNLOAD_ONLY[@]}" 2>&1 | sed '/neither a file nor a directory/d' >&2 ||
        die "pip download of the aarch64 wheels failed"
    "$PYTHON" - "$WHEEL_CACHE" "$site" "${WHEELS[@]}" <<'EOF'
import re, sys, zipfile
from pathlib import Path
cache, site, specs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
for spec in specs:
    name, version = spec.split("==")
    # Wheel file names normalize the project name to underscores; match name and version exactly.
    found = [w for w in cache.glob("*.whl")
             if norm(w.name.split("-")[0]) == norm(name) and w.name.split("-")[1] == version
             and ("aarch64" in w.name or w.name.endswith("-any.whl"))]
    if not found:
        sys.exit(f"[setup-arm64] error: no aarch64 wheel for {spec} in {cache}")
    with zipfile.ZipFile(sorted(found)[-1]) as zf:
        zf.extractall(site)
EOF
}

# Bytecode does not depend on the CPU, and Debian's .pyc files are normally made by postinst
# scripts that never ran here: without this every emulated start compiles its imports again
# (the import of numpy+onnxruntime+tvm took 35 s instead of 16 s). Needs a host Python 3.11 (same
# pyc magic number); otherwise skipped, which only costs time.
precompile() {
    local dir=$1
    if "$PYTHON" -c "import sys; sys.exit(sys.version_info[:2] != (3, $PYVER_MINOR))" 2>/dev/null; then
        log "precompiling .pyc files (host $("$PYTHON" --version 2>&1))"
        "$PYTHON" -m compileall -q -j 2 -x '/(test|tests|idlelib|lib2to3|tkinter|turtledemo)/' \
            "$dir/usr/lib/python$PYVER" "$dir/opt/edgeforge/site" >/dev/null 2>&1 || true
    else
        log "not precompiling: $PYTHON is not Python $PYVER (emulated imports will be slower)"
    fi
}

# qemu 7.2 passes the host's x86 /proc/cpuinfo through to aarch64 programs; onnxruntime's cpuinfo
# finds no ARM processors there and segfaults at import. qemu -L serves ROOT/proc/cpuinfo instead
# when it exists, so write one that describes Cortex-A76 cores (a Raspberry Pi 5), one entry per
# host CPU (the /sys topology it also reads is the host's). edgeforge.toolchains rewrites it when
# the host's CPU count changes.
write_cpuinfo() {
    local dir=$1 n
    n=$(nproc --all)
    mkdir -p "$dir/proc"
    for ((i = 0; i < n; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\n' "$i"
        printf 'Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n'
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n'
    done >"$dir/proc/cpuinfo"
}

prove() {
    local dir=$1
    log "checking the emulated python (numpy, tokenizers, jinja2, onnxruntime, tvm_ffi)"
    PYTHONPATH="$dir/opt/edgeforge/site" PYTHONNOUSERSITE=1 TVM_USE_RUNTIME_LIB=1 \
        qemu-aarch64-static -cpu cortex-a76 -L "$dir" "$dir/usr/bin/python$PYVER" -c '
import platform, numpy, tokenizers, jinja2, onnxruntime, tvm_ffi, ml_dtypes
assert platform.machine() == "aarch64", platform.machine()
assert "CPUExecutionProvider" in onnxruntime.get_available_providers()
print("aarch64 python", platform.python_version(), "numpy", numpy.__version__,
      "onnxruntime", onnxruntime.__version__, "tvm_ffi", tvm_ffi.__version__)
' >&2 || die "the arm64 python in $dir cannot import the runtime packages"
}

ensure_host_tools
mkdir -p "$TOOLS"
exec 9>"$TOOLS/.arm64.lock"
flock 9
# Another process may have finished the same build while we waited for the lock.
if [[ $MODE == build ]] && is_ready; then
    log "arm64 root ready (built by another process): $ROOT"
    echo "$ROOT"
    exit 0
fi

# Holding the lock, no other build is running: clear what a killed one left behind.
rm -rf "$TOOLS"/.arm64-root.tmp-* "$TOOLS"/.arm64-root.old-*
BUILD="$TOOLS/.arm64-root.tmp-$$"
# EDGEFORGE_KEEP_BUILD=1 keeps a failed build folder for debugging.
[[ ${EDGEFORGE_KEEP_BUILD:-0} == 1 ]] ||
    trap 'rm -rf "$BUILD" "$BUILD.debootstrap.log" "$TOOLS/.arm64-root.old-$$"' EXIT
rm -rf "$BUILD"
START=$SECONDS
make_root "$BUILD"
install_wheels "$BUILD"
write_cpuinfo "$BUILD"
precompile "$BUILD"
prove "$BUILD"
echo "$STAMP_TEXT" >"$BUILD/.edgeforge-stamp"
[[ -e "$ROOT" ]] && mv "$ROOT" "$TOOLS/.arm64-root.old-$$"
mv "$BUILD" "$ROOT"
log "arm64 root built in $((SECONDS - START)) s: $ROOT ($(du -sh "$ROOT" | cut -f1))"
echo "$ROOT"
