"""Errors raised by the device-side bundle code (smoke, manifest checks, loader).

They live in the runtime because bundles run without the compiler; the compiler's CLI turns them
into EdgeforgeError / CheckFailed with the same exit codes.
"""


class Failure(Exception):
    """Every failure edgeforge reports: one line, an exit code. The compiler's EdgeforgeError and
    the runtime's errors below all derive from it, so the CLI and smoke.py have one error path."""

    exit_code = 2


class BundleError(Failure):
    """The bundle or this machine cannot be used (tampered file, missing runtime, wrong device): exit 2."""

    exit_code = 2


class CannotRunHere(BundleError):
    """The bundle is fine but needs hardware or an OS this machine does not have: exit 2."""


class SmokeFailed(Failure):
    """The bundle ran and its outputs disagree with the golden data: exit 1."""

    exit_code = 1


class InternalError(Failure):
    """A bug in edgeforge (not the input's fault): exit 70 (EX_SOFTWARE), so callers and tests can
    tell it from bad input (2). The CLI maps every unexpected exception to it."""

    exit_code = 70
