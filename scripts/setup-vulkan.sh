#!/usr/bin/env bash
# Build (once) a software Vulkan GPU for testing Vulkan/WebGPU bundles without a GPU: Mesa >= 25
# lavapipe from Debian bookworm-backports, unpacked into a private folder (nothing is installed
# system-wide; the system's Mesa is untouched), plus a separate venv with onnxruntime-webgpu (its
# import name is `onnxruntime`, so it must never share a venv with the CPU onnxruntime).
#
#   scripts/setup-vulkan.sh            build if needed, then print the folder (last line)
#   scripts/setup-vulkan.sh --check    exit 0 if ready, 1 if not; changes nothing
#   scripts/setup-vulkan.sh --force    rebuild even if the stamp says it is ready
#
# Layout: ${EDGEFORGE_CACHE:-~/.cache/edgeforge}/toolchains/vulkan/
#   mesa/           dpkg -x of mesa-vulkan-drivers, the Vulkan loader and the libs the host lacks
#   mesa/lvp_icd.json   ICD manifest naming mesa/.../libvulkan_lvp.so by absolute path
#   venv/           python venv: onnxruntime-webgpu, numpy, tokenizers, jinja2
#   env.sh          `. env.sh` sets LD_LIBRARY_PATH, VK_DRIVER_FILES, VK_ICD_FILENAMES
#   check_webgpu.py, vulkan_probe.py   the check run at the end (MatMul on WebGPU vs numpy)
#   packages.txt    the Debian packages (name=version) unpacked into mesa/
# Debian's own bookworm Mesa (22.3) lavapipe is refused by Dawn, hence backports.
set -euo pipefail

MIRROR="${EDGEFORGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
MESA_RELEASE=bookworm-backports
VENV_PACKAGES=(onnxruntime-webgpu==1.27.0 numpy==2.4.6 tokenizers==0.23.3 jinja2==3.1.6)
STAMP_TEXT="edgeforge-vulkan v1 mesa=$MESA_RELEASE venv=${VENV_PACKAGES[*]}"

CACHE_BASE="${EDGEFORGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeforge}"
TOOLS="$CACHE_BASE/toolchains"
BASE="$TOOLS/vulkan"
STAMP="$BASE/.edgeforge-stamp"
PYTHON="${PYTHON:-python3}"
ARCH_TRIPLET=x86_64-linux-gnu

SETUP_NAME=setup-vulkan
. "$(dirname "${BASH_SOURCE[0]}")/lib-setup.sh"
is_ready() { [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]; }

setup_start "lavapipe + webgpu venv ready" "$BASE" "$@"
[[ $(dpkg --print-architecture 2>/dev/null) == amd64 ]] || die "only x86-64 (amd64) Debian hosts are supported"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
    die "$PYTHON is not Python >= 3.10 (set PYTHON=...)"
# Debian's system python makes venvs only with python3-venv (ensurepip) installed.
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    [[ $(id -u) -eq 0 ]] || die "$PYTHON cannot make a venv: apt-get install python3-venv (or set PYTHON=...)"
    log "apt-get install python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends \
        python3-venv >&2 || die "apt-get install python3-venv failed"
fi
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "needs a Debian/Ubuntu host (apt-get, dpkg-deb)"

# --- a private apt configuration: bookworm + backports lists, used only for downloads ----------
APT_OPTS=()
setup_private_apt() {
    local apt=$1
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/parts" "$apt/prefs"
    cat >"$apt/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $MESA_RELEASE main
EOF
    # The real dpkg status stays in use (read only): apt then tells which libraries this host
    # lacks or has too old for backports' Mesa, and only those are downloaded.
    APT_OPTS=(-q -o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/parts"
        -o "Dir::Etc::PreferencesParts=$apt/prefs" -o "Dir::State::Lists=$apt/lists"
        -o "Dir::Cache=$apt/cache" -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
    log "apt-get update (private lists: bookworm + $MESA_RELEASE)"
    # --error-on=any: without it an unreachable mirror is only a warning and the failure shows up
    # later as a confusing "Unable to locate package".
    apt-get "${APT_OPTS[@]}" update --error-on=any >"$apt/update.log" 2>&1 || {
        tail -n 5 "$apt/update.log" >&2
        die "apt-get update of bookworm + $MESA_RELEASE from $MIRROR failed (its last lines are above)"
    }
}

download_mesa() {
    local dir=$1 apt="$1/apt" debs="$1/debs"
    setup_private_apt "$apt"
    # Simulate installing backports' lavapipe on this host: the "Inst" lines are exactly the
    # packages (and versions) to fetch. The loader is fetched even when the host has one, so the
    # folder is self-contained.
    local plan
    if ! plan=$(apt-get "${APT_OPTS[@]}" -s install --no-install-recommends \
        "mesa-vulkan-drivers/$MESA_RELEASE" libvulkan1 2>&1); then
        die "apt cannot resolve mesa-vulkan-drivers/$MESA_RELEASE: $(echo "$plan" | tail -1)"
    fi
    local pkgs=()
    mapfile -t pkgs < <(echo "$plan" | sed -n 's/^Inst \([^ ]*\) \(\[[^]]*\] \)\{0,1\}(\([^ ]*\) .*/\1=\3/p')
    local loader
    loader=$(apt-cache "${APT_OPTS[@]}" policy libvulkan1 | sed -n 's/^ *Candidate: //p')
    [[ " ${pkgs[*]} " == *" libvulkan1="* ]] || pkgs+=("libvulkan1=$loader")
    [[ ${#pkgs[@]} -gt 0 ]] || die "apt planned no packages for mesa-vulkan-drivers/$MESA_RELEASE"
    log "apt-get download ${#pkgs[@]} packages: ${pkgs[*]}"
    mkdir -p "$debs"
    (cd "$debs" && apt-get "${APT_OPTS[@]}" download "${pkgs[@]}" >&2) || die "apt-get download failed"
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$dir/mesa"; done
    printf '%s\n' "${pkgs[@]}" >"$dir/packages.txt"  # what was unpacked, for reports
}

write_icd() {
    local mesa=$1 lib shipped api
    lib=$(find "$mesa" -name libvulkan_lvp.so -print -quit)
    [[ -n $lib ]] || die "no libvulkan_lvp.so in the unpacked mesa-vulkan-drivers"
    shipped=$(find "$mesa" -name 'lvp_icd*.json' -print -quit)
    api=$(sed -n 's/.*"api_version": *"\([^"]*\)".*/\1/p' "$shipped" | head -1)
    cat >"$mesa/lvp_icd.json" <<EOF
{"file_format_version": "1.0.1", "ICD": {"library_path": "$lib", "api_version": "${api:-1.3.0}"}}
EOF
}

write_env() {
    local dir=$1 final=$2
    # Paths name the final location (the build folder is renamed there at the end).
    cat >"$dir/env.sh" <<EOF
# Source this to run Vulkan programs on edgeforge's private lavapipe (Mesa from $MESA_RELEASE).
export LD_LIBRARY_PATH="$final/mesa/usr/lib/$ARCH_TRIPLET\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export VK_DRIVER_FILES="$final/mesa/lvp_icd.json"
export VK_ICD_FILENAMES="$final/mesa/lvp_icd.json"
EOF
    sed -i "s#\"library_path\": \"$dir/#\"library_path\": \"$final/#" "$dir/mesa/lvp_icd.json"
}

make_venv() {
    local dir=$1
    log "python venv with ${VENV_PACKAGES[*]}"
    "$PYTHON" -m venv "$dir/venv" >&2
    # (sed drops pip's noise about index folders that some machines configure but lack)
    "$dir/venv/bin/python" -m pip install --quiet --only-binary=:all: "${VENV_PACKAGES[@]}" 2>&1 |
        sed '/neither a file nor a directory/d' >&2 ||
        die "pip install ${VENV_PACKAGES[*]} into the webgpu venv failed"
}

mkdir -p "$TOOLS"
exec 9>"$TOOLS/.vulkan.lock"
flock 9
if [[ $MODE == build ]] && is_ready; then
    log "lavapipe + webgpu venv ready (built by another process): $BASE"
    echo "$BASE"
    exit 0
fi

# Holding the lock, no other build is running: clear what a killed one left behind.
rm -rf "$TOOLS"/.vulkan.tmp-* "$TOOLS"/.vulkan.old-*
BUILD="$TOOLS/.vulkan.tmp-$$"
[[ ${EDGEFORGE_KEEP_BUILD:-0} == 1 ]] || trap 'rm -rf "$BUILD" "$TOOLS/.vulkan.old-$$"' EXIT
rm -rf "$BUILD"
mkdir -p "$BUILD/mesa"
START=$SECONDS
download_mesa "$BUILD"
write_icd "$BUILD/mesa"
write_env "$BUILD" "$BASE"
rm -rf "$BUILD/debs" "$BUILD/apt"
make_venv "$BUILD"
# A venv's scripts name its own path, so it is moved into place before the check runs; a failed
# check removes it again.
[[ -e "$BASE" ]] && mv "$BASE" "$TOOLS/.vulkan.old-$$"
mv "$BUILD" "$BASE"
trap 'rm -rf "$TOOLS/.vulkan.old-$$"' EXIT
HERE=$(cd "$(dirname "$0")" && pwd)
cp "$HERE/check_webgpu.py" "$HERE/../edgeforge/vulkan_probe.py" "$BASE/"
if ! (. "$BASE/env.sh" && "$BASE/venv/bin/python" "$BASE/check_webgpu.py" --expect-device llvmpipe >&2); then
    rm -rf "$BASE"
    die "onnxruntime-webgpu did not run on lavapipe (see the lines above)"
fi
echo "$STAMP_TEXT" >"$STAMP"
log "lavapipe + webgpu venv built in $((SECONDS - START)) s: $BASE ($(du -sh "$BASE" | cut -f1))"
echo "$BASE"
