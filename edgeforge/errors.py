"""Errors with exit codes. The CLI turns them into one line on stderr and a documented exit code."""

from .runtime.bundle_errors import Failure, InternalError  # noqa: F401 - re-exported

EXIT_INTERNAL = InternalError.exit_code  # 70: a bug in edgeforge


class EdgeforgeError(Failure):
    """Bad input, an unusable bundle or a missing toolchain/accelerator: exit code 2.

    The message must name the file, tensor or option at fault.
    """

    exit_code = 2


class CheckFailed(EdgeforgeError):
    """A verification ran and did not pass (smoke FAIL): exit code 1."""

    exit_code = 1
