#!/usr/bin/env bash
# The `web` target's toolchain: Debian's chromium (apt; headless smoke/bench of web bundles) and
# the pinned npm packages the page ships (onnxruntime-web, the tokenizer and jinja libraries),
# installed with npm into a private folder. Idempotent; nothing is downloaded at run time.
#
#   scripts/setup-web.sh            install if needed, then print the folder (last line)
#   scripts/setup-web.sh --check    exit 0 if ready, 1 if not; changes nothing
#   scripts/setup-web.sh --force    reinstall the npm packages even if the stamp says ready
#
# Layout: ${EDGEFORGE_CACHE:-~/.cache/edgeforge}/toolchains/web/
#   node_modules/   onnxruntime-web, @huggingface/tokenizers, @huggingface/jinja (npm, pinned)
#   packages.txt    name@version of each
# The versions must match NPM_PACKAGES in edgeforge/web/__init__.py (the check below compares them).
set -euo pipefail

NPM_PACKAGES=(onnxruntime-web@1.31.1 @huggingface/tokenizers@0.2.0 @huggingface/jinja@0.5.13)
STAMP_TEXT="edgeforge-web v1 npm=${NPM_PACKAGES[*]}"
CHROMIUM="${EDGEFORGE_CHROMIUM:-/usr/bin/chromium}"

CACHE_BASE="${EDGEFORGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeforge}"
TOOLS="$CACHE_BASE/toolchains"
BASE="$TOOLS/web"
STAMP="$BASE/.edgeforge-stamp"

SETUP_NAME=setup-web
. "$(dirname "${BASH_SOURCE[0]}")/lib-setup.sh"
is_ready() { [[ -x "$CHROMIUM" && -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]; }

setup_start "chromium + onnxruntime-web ready" "$BASE" "$@"

if [[ ! -x "$CHROMIUM" ]]; then
    command -v apt-get >/dev/null || die "$CHROMIUM is missing and there is no apt-get: install Chromium and set EDGEFORGE_CHROMIUM"
    [[ $(id -u) == 0 ]] || die "$CHROMIUM is missing: run 'apt-get install chromium' as root (or set EDGEFORGE_CHROMIUM)"
    log "installing Debian's chromium (apt-get) ..."
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
fi
command -v npm >/dev/null || die "npm is missing: apt-get install npm"

mkdir -p "$TOOLS"
exec 9>"$TOOLS/.web.lock"
flock 9
if [[ $MODE == build ]] && is_ready; then  # another process finished it while we waited
    echo "$BASE"
    exit 0
fi
rm -rf "$TOOLS"/.web.tmp-*
BUILD="$TOOLS/.web.tmp-$$"
trap 'rm -rf "$BUILD" "$TOOLS/.web.old-$$"' EXIT
mkdir -p "$BUILD"
log "installing ${NPM_PACKAGES[*]} (npm) ..."
npm install --silent --no-audit --no-fund --prefix "$BUILD" "${NPM_PACKAGES[@]}" >&2
printf '%s\n' "${NPM_PACKAGES[@]}" >"$BUILD/packages.txt"
echo "$STAMP_TEXT" >"$BUILD/.edgeforge-stamp"
[[ -e "$BASE" ]] && mv "$BASE" "$TOOLS/.web.old-$$"
mv "$BUILD" "$BASE"
log "web toolchain ready: $BASE ($(du -sh "$BASE" | cut -f1)), $("$CHROMIUM" --version 2>/dev/null | head -1)"
echo "$BASE"
