"""The `edgeforge` command line: a thin click group over edgeforge/commands/*.

Exit codes (every command): 0 success; 1 a check ran and failed (smoke FAIL); 2 bad input, an
unusable bundle, or a missing toolchain/accelerator (the message says which).
"""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__
from .errors import EdgeforgeError
from .runtime.bundle_errors import BundleError, SmokeFailed

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
    "smoke": "edgeforge.commands.bundle_cmds:smoke",
    "run": "edgeforge.commands.bundle_cmds:run",
    "bench": "edgeforge.commands.bundle_cmds:bench",
    "targets": "edgeforge.commands.bundle_cmds:targets",
    "doctor": "edgeforge.commands.bundle_cmds:doctor",
    "plan": "edgeforge.commands.bundle_cmds:plan",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._load(name, quiet=True) is not None]

    def get_command(self, ctx, name):
        return self._load(name, quiet=False)

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

    Exit codes: 0 ok, 1 a check failed, 2 bad input or unusable environment.
    """


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="edgeforge", standalone_mode=False)
    except (EdgeforgeError, BundleError, SmokeFailed) as err:
        # The runtime's errors (raised on the device side too) carry the same exit codes.
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(2)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    sys.exit(0)


if __name__ == "__main__":
    main()
