# Shared by scripts/setup-*.sh (sourced, not run): logging, the options every setup script takes,
# and the cached fast path. The caller sets SETUP_NAME and defines is_ready() first.

log() { echo "[$SETUP_NAME] $*" >&2; }
die() { echo "[$SETUP_NAME] error: $*" >&2; exit 2; }

# setup_start READY_MESSAGE PATH "$@": handles --check / --force / --help; when nothing needs doing,
# prints PATH and exits 0. Leaves MODE=build or MODE=force for the caller.
setup_start() {
    local ready_message=$1 path=$2
    shift 2
    MODE=build
    case "${1:-}" in
        --check) is_ready && exit 0 || exit 1 ;;
        --force) MODE=force ;;
        "") ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown option '$1' (use --check, --force or nothing)" ;;
    esac
    if [[ $MODE == build ]] && is_ready; then
        log "$ready_message (cached): $path"
        echo "$path"
        exit 0
    fi
}
