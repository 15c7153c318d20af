"""The `edgeforge` command line: a thin click group over edgeforge/commands/*.

Exit codes (every command): 0 success; 1 a check ran and failed (smoke FAIL); 2 bad input, an
unusable bundle, or a missing toolchain/accelerator (the message says which); 70 a bug in edgeforge
(an internal error: please report it with the --debug traceback); 130 interrupted; 143 terminated.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import click

from . import __version__
from .progress import configure
from .errors import EXIT_INTERNAL
from .runtime.bundle_errors import Failure

# name -> "module:attribute". Imported on first use so `edgeforge --help` stays fast and a missing
# optional dependency (tvm, onnx) only affects the commands that need it.
COMMANDS = {
    "fetch-model": "edgeforge.commands.model_cmds:fetch_model",
    "inspect": "edgeforge.commands.model_cmds:inspect",
    "generate": "edgeforge.commands.model_cmds:generate",
    "quantize": "edgeforge.commands.quant_cmds:quantize",
    "eval": "edgeforge.commands.quant_cmds:eval_cmd",
    "compile": "edgeforge.commands.compile_cmd:compile_cmd",
    "build": "edgeforge.commands.bundle_cmds:build",
    "verify": "edgeforge.commands.bundle_cmds:verify",
    "smoke": "edgeforge.commands.bundle_cmds:smoke",
    "run": "edgeforge.commands.bundle_cmds:run",
    "bench": "edgeforge.commands.bundle_cmds:bench",
    "serve": "edgeforge.commands.serve_cmd:serve",
    "targets": "edgeforge.commands.bundle_cmds:targets",
    "doctor": "edgeforge.commands.bundle_cmds:doctor",
    "plan": "edgeforge.commands.bundle_cmds:plan",
    "toolchains": "edgeforge.commands.toolchain_cmds:toolchains",
}


# -q/-v: on the group (`edgeforge -v build ...`) and, added when a command loads, on every command
# and subcommand (`edgeforge build ... -v`), so click parses them (an option value such as
# `--prompt -v` stays a value). Counted: each -v adds one, each -q takes one away.
VERBOSITY = "edgeforge.verbosity"


def _set_verbosity(ctx, param, value):
    if value:
        level = ctx.meta.get(VERBOSITY, 0) + (value if param.name == "verbose" else -value)
        ctx.meta[VERBOSITY] = level  # meta is shared by the group's and the command's contexts
        configure(level)


def _verbosity_options(quiet_help="Only warnings and errors on stderr (no progress).",
                       verbose_help="Also debug details on stderr (per tensor, per prompt, compile stages)."):
    return [
        click.Option(["-q", "--quiet"], count=True, expose_value=False, callback=_set_verbosity, help=quiet_help),
        click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_set_verbosity, help=verbose_help),
    ]


def _add_verbosity(cmd) -> None:
    """Give a command (and a group's subcommands) -q/-v, unless it has options of those names."""
    if getattr(cmd, "_edgeforge_verbosity", False):
        return
    taken = {opt for p in cmd.params for opt in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
    cmd.params.extend(o for o in _verbosity_options() if not taken & set(o.opts))
    cmd._edgeforge_verbosity = True
    for sub in getattr(cmd, "commands", {}).values():
        _add_verbosity(sub)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._load(name, quiet=True) is not None]

    def get_command(self, ctx, name):
        cmd = self._load(name, quiet=False)
        if cmd is not None:
            _add_verbosity(cmd)
        return cmd

    @staticmethod
    def _load(name, quiet):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            if quiet:
                return None
            raise


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeforge")
def cli():
    """Compile a Llama-family model into a smoke-tested deployment bundle.

    \b
    Example:
      edgeforge fetch-model smollm2-135m
      edgeforge build smollm2-135m --quant q4f16 --target x86-cpu -o dist
      edgeforge smoke dist/smollm2-135m-q4f16-x86-cpu-tvm

    Output: results on stdout (--json keeps it pure JSON); progress on stderr: a bar on a terminal,
    plain lines about every 10% elsewhere (CI, pipes, files). -q shows only warnings and errors,
    -v adds debug details; both work before or after the command name.

    Exit codes: 0 ok, 1 a check failed, 2 bad input or unusable environment, 70 a bug in edgeforge
    (internal error), 130 interrupted, 143 terminated (SIGTERM; temporary folders are removed).
    --debug (anywhere) prints the traceback of a failure as well as its one-line message.
    """


cli.params.extend(_verbosity_options())
cli._edgeforge_verbosity = True


def _terminate(signum, _frame):
    """SIGTERM unwinds like Ctrl-C: every temporary folder is removed on the way out."""
    raise SystemExit(128 + signum)


def main(argv=None):
    """Run the CLI. Every failure is one `error:` line on stderr and an exit code (module docstring);
    `--debug` (anywhere on the line, or EDGEFORGE_DEBUG=1) adds the Python traceback."""
    import signal

    argv_is_main = argv is None  # in-process callers (tests) get SystemExit, never os._exit
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("EDGEFORGE_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    previous_debug = os.environ.get("EDGEFORGE_DEBUG")
    if debug:
        os.environ["EDGEFORGE_DEBUG"] = "1"  # worker processes (build --jobs) print tracebacks too
    configure(0)  # INFO on stderr until -q/-v say otherwise (reset for each in-process run)
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        pass
    code = 0
    try:
        cli.main(args=argv, prog_name="edgeforge", standalone_mode=False)
    except Failure as err:
        # The runtime's errors (raised on the device side too) carry the same exit codes.
        code = _fail(str(err), err.exit_code, debug)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        code = 130
    except click.UsageError as err:  # one line, like every other failure
        where = f" (edgeforge {err.ctx.command_path.split(' ', 1)[1]} --help)" if err.ctx and " " in err.ctx.command_path else ""
        code = _fail(f"{err.format_message()}{where}", 2, False)
    except click.ClickException as err:
        code = _fail(err.format_message(), 2, debug)
    except click.exceptions.Exit as err:
        code = err.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        code = 130
    except OSError as err:  # unwritable or full output locations, vanished files
        where = f"{err.filename}: " if err.filename else ""
        code = _fail(f"{where}{err.strerror or err}", 2, debug)
    except RecursionError as err:
        code = _fail(f"input too deeply nested ({err})", 2, debug)
    except MemoryError as err:  # a size from the input that no check caught first: not a bug in the code path
        code = _fail(f"out of memory ({err or 'MemoryError'}): the input asks for more memory than this machine "
                     "has (a model, context or prompt too large for it)", 2, debug)
    except Exception as err:  # noqa: BLE001 - the one error path: never a bare traceback
        code = _fail(internal_message(err), EXIT_INTERNAL, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_debug is None:
            os.environ.pop("EDGEFORGE_DEBUG", None)
        else:
            os.environ["EDGEFORGE_DEBUG"] = previous_debug
    if argv_is_main and _webgpu_opened():
        _exit_without_teardown(code)
    sys.exit(code)


def _webgpu_opened() -> bool:
    engine = sys.modules.get("edgeforge.runtime.onnx_engine")
    return bool(engine and engine.WEBGPU_SESSIONS)


def _exit_without_teardown(code: int):
    """Leave after a WebGPU session: Dawn can crash while the interpreter tears its objects down, which
    would turn a finished command's exit code into 139. The exit handlers (our temporary copies) run
    first; then nothing else."""
    import atexit

    atexit._run_exitfuncs()  # noqa: SLF001 - the documented handlers, run before os._exit skips them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def internal_message(err: BaseException) -> str:
    return (f"internal error ({type(err).__name__}: {err}); this is a bug in edgeforge: rerun with --debug "
            "for the traceback and report it")


def _fail(message: str, code: int, debug: bool) -> int:
    """One `error:` line. Messages quote file names, tensor names and metadata from the input: any
    control character (a terminal escape sequence starts with one) is shown as a space."""
    from .runtime.smoke import printable

    if debug:
        click.echo(traceback.format_exc().rstrip(), err=True)
    click.echo(f"error: {printable(message, 4000)}", err=True)
    return code


if __name__ == "__main__":
    main()
