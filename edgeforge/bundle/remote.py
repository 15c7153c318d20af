"""`edgeforge smoke --ssh USER@HOST`: copy a verified bundle to a device over SFTP and run its smoke.py.

The device needs Python 3 with the bundle's requirements.txt installed. The remote exit code (0 PASS,
1 FAIL, 2 unusable) is passed through; a host that cannot be reached or refuses us is exit 2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shlex
import signal
import socket
import threading
from pathlib import Path

from ..errors import EdgeforgeError

logger = logging.getLogger(__name__)


def parse_dest(dest: str) -> tuple[str, str]:
    user, sep, host = dest.rpartition("@")
    if not host or (sep and not user):
        raise EdgeforgeError(f"--ssh {dest!r}: expected USER@HOST or HOST")
    return (user or os.environ.get("USER") or "root"), host


def connect(dest: str, port: int = 22, identity: str | None = None, known_hosts: str | None = None,
            timeout: float = 10.0):
    try:
        import paramiko
    except ImportError:
        raise EdgeforgeError("--ssh needs paramiko: pip install 'edgeforge[ssh]'") from None
    # paramiko logs its own tracebacks (a bad banner, say); our one-line error says what failed
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    user, host = parse_dest(dest)
    client = paramiko.SSHClient()
    client.load_system_host_keys()
    remembered = None
    if known_hosts:
        client.load_host_keys(known_hosts)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        # ssh's StrictHostKeyChecking=accept-new: a device seen for the first time is remembered in
        # edgeforge's own known_hosts (never ~/.ssh's), and a changed key is refused from then on.
        remembered = known_hosts_file()
        if remembered.exists():
            client.load_host_keys(str(remembered))
        client.set_missing_host_key_policy(_AcceptNew(remembered))
    where = f"{user}@{host}:{port}"
    try:
        client.connect(host, port=port, username=user, key_filename=identity, timeout=timeout,
                       banner_timeout=timeout, auth_timeout=timeout, look_for_keys=identity is None,
                       allow_agent=identity is None)
    except (socket.gaierror, socket.timeout, TimeoutError, ConnectionError, OSError) as err:
        raise EdgeforgeError(f"--ssh {where}: cannot connect ({type(err).__name__}: {err})") from None
    except paramiko.BadHostKeyException:
        source = known_hosts or remembered or "the system's known_hosts"
        raise EdgeforgeError(f"--ssh {where}: the host key changed since it was recorded in {source}; refusing "
                             "(if the device was reinstalled, delete its line there)") from None
    except paramiko.SSHException as err:
        raise EdgeforgeError(f"--ssh {where}: ssh failed ({type(err).__name__}: {err})") from None
    return client


def known_hosts_file() -> Path:
    from ..cache import cache_dir

    return cache_dir() / "known_hosts"


class _AcceptNew:
    """paramiko missing-host-key policy: remember a new host key (accept-new)."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        client.save_host_keys(str(self.path))


def remote_command(python: str) -> str:
    """The device's Python command with every word quoted ("python3 -X utf8" stays two words;
    "python3; rm -rf ~" cannot become a second command)."""
    return " ".join(shlex.quote(word) for word in shlex.split(python)) or "python3"


def _upload(sftp, local: Path, remote: str) -> int:
    count = 0
    for dirpath, dirnames, filenames in os.walk(local):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        rel = Path(dirpath).relative_to(local).as_posix()
        rdir = remote if rel == "." else posixpath.join(remote, rel)
        if rel != ".":
            sftp.mkdir(rdir)
        for name in sorted(filenames):
            sftp.put(str(Path(dirpath, name)), posixpath.join(rdir, name))
            count += 1
    return count


def _exec(client, command: str, timeout: float | None = None) -> tuple[int, str, str]:
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out, err = stdout.read().decode(errors="replace"), stderr.read().decode(errors="replace")
    return stdout.channel.recv_exit_status(), out, err


def _upload_and_run(client, dest: str, bundle: Path, remote: str, python: str,
                    smoke_args: tuple[str, ...]) -> tuple[int, str, str]:
    sftp = client.open_sftp()
    try:
        sftp.mkdir(remote)
        n = _upload(sftp, bundle, remote)
    finally:
        sftp.close()
    logger.info(f"copied {n} files to {dest}:{remote}")
    _clean_stale_uploads(client, dest, remote, python)
    cmd = " ".join([f"cd {shlex.quote(remote)} && {remote_command(python)} smoke.py --json", *map(shlex.quote, smoke_args)])
    code, out, err = _exec(client, cmd)
    if code == 127:
        raise EdgeforgeError(f"--ssh {dest}: '{python}' not found on the device ({err.strip()})")
    return code, out, err


@contextlib.contextmanager
def _signals_deferred():
    """SIGTERM and Ctrl-C arriving inside the block are acted on when it ends, with the handlers that
    were in place (main thread only; the block is bounded: the removal has its own timeout)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught[:1]:
            signal.raise_signal(signum)


def _remove_remote(client, dest: str, folder: str) -> None:
    """Remove the device's temp folder and its lock file; a broken connection is reported, never
    raised over the error that is already on its way out."""
    from ..runtime.manifest_check import LOCK_SUFFIX

    # smoke.py may still be running there (we were interrupted) and writing into the folder (bytecode
    # caches): a second pass removes what the first raced with.
    rm = f"rm -rf {shlex.quote(folder)} {shlex.quote(folder + LOCK_SUFFIX)}"
    try:
        code, _, err = _exec(client, f"{rm} 2>/dev/null || (sleep 1; {rm})", timeout=60)
    except Exception as exc:  # noqa: BLE001 - cleanup must not mask the real outcome
        code, err = None, f"{type(exc).__name__}: {exc}"
    if code != 0:
        logger.warning(f"--ssh {dest}: could not remove {folder} on the device ({str(err).strip()[:200]})")


# The device's folder is an edgeforge temporary folder like the host's (runtime/manifest_check.py:
# `.edgeforge-smoke.tmp-PID-XXXX` and its marker lock file), locked by a holder process for as long as
# this connection lives: a local SIGKILL drops the connection, the holder sees its stdin end and exits,
# the lock is free, and the next `smoke --ssh` to that device removes the folder (and nothing else:
# not a folder without the marker, not one whose lock is held by another run in progress).
_HOLDER = """
import fcntl, os, sys, tempfile
folder = tempfile.mkdtemp(prefix=".edgeforge-smoke.tmp-%d-" % os.getpid(), dir="/tmp")
fd = os.open(folder + {lock_suffix!r}, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, {marker!r})
print(folder, flush=True)
sys.stdin.read()
"""
_CLEANER = ("import sys; sys.dont_write_bytecode = True; sys.path.insert(0, 'runtime'); "  # no caches in the bundle
            "from edgeforge_runtime.manifest_check import clean_stale_temps; "
            "print(len(clean_stale_temps('/tmp')))")


def _hold_remote_folder(client, dest: str, python: str):
    """(folder, channel): a new marked folder on the device, locked until the channel closes."""
    from ..runtime.manifest_check import LOCK_SUFFIX, MARKER

    script = _HOLDER.format(lock_suffix=LOCK_SUFFIX, marker=MARKER)
    stdin, stdout, stderr = client.exec_command(f"{remote_command(python)} -c {shlex.quote(script)}")
    folder = stdout.readline().strip()
    if not folder.startswith("/tmp/.edgeforge-smoke.tmp-"):
        if stdout.channel.recv_exit_status() == 127:
            raise EdgeforgeError(f"--ssh {dest}: '{python}' not found on the device")
        raise EdgeforgeError(f"--ssh {dest}: cannot make a temp folder on the device: "
                             f"{stderr.read().decode(errors='replace').strip()[-300:]}")
    return folder, stdin


def _clean_stale_uploads(client, dest: str, remote: str, python: str) -> None:
    """Remove what earlier smokes killed with SIGKILL left on the device, with the uploaded runtime's
    own clean_stale_temps (the code that cleans the host's temporary folders)."""
    code, out, err = _exec(client, f"cd {shlex.quote(remote)} && {remote_command(python)} -c {shlex.quote(_CLEANER)}",
                           timeout=120)
    if code == 0 and out.strip() not in ("", "0"):
        logger.info(f"--ssh {dest}: removed {out.strip()} stale upload(s) of earlier smokes")
    elif code != 0:
        logger.warning(f"--ssh {dest}: could not look for stale uploads ({err.strip()[-200:]})")


def smoke_over_ssh(bundle: Path, dest: str, port: int = 22, identity: str | None = None,
                   python: str = "python3", known_hosts: str | None = None,
                   keep: bool = False, smoke_args: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """Copy the bundle to a fresh temp folder on the device, run smoke.py --json, clean up.

    Returns (exit code, stdout, stderr) of the remote smoke.py.
    """
    client = connect(dest, port, identity, known_hosts)
    try:
        folder, holder = _hold_remote_folder(client, dest, python)
        try:
            remote = posixpath.join(folder, Path(bundle).name)
            return _upload_and_run(client, dest, Path(bundle), remote, python, smoke_args)
        finally:  # every exit: success, FAIL, an upload error, a missing Python, Ctrl-C, SIGTERM
            if not keep:
                with _signals_deferred():  # a SIGTERM now must not cut the removal short
                    _remove_remote(client, dest, folder)
            holder.close()
    finally:
        client.close()
