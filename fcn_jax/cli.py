"""The ``fcn-jax`` command line: ``fcn-jax COMMAND --help`` for each command.

Each command lives in a module with ``register(subparsers)``; the parser sets ``func``.
Errors in user files print one line (``fcn-jax: error: FILE: layer 'x': field: ...``) and
exit with status 2, never a traceback; status 3 when one of several processes
(``--coordinator``) did not join or died.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

from converters import CaffeFormatError
from fcn_jax.distributed import DistributedError

#: Modules that contribute commands, in --help order.
COMMAND_MODULES = (
    "fcn_jax.commands.core",      # info, run, convert
    "fcn_jax.commands.surgery",   # fcn, demo
    "fcn_jax.commands.predict",   # predict
    "fcn_jax.commands.finetune",  # finetune
    "fcn_jax.commands.train",     # train (a Caffe solver.prototxt)
    "fcn_jax.commands.deploy",    # export
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcn-jax", description="Caffe models in JAX: load, run, net surgery, fine-tune.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fcn-jax`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:  # `fcn-jax info ... | head`: the reader left, nothing to say
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
    except (CaffeFormatError, OSError) as e:
        print(f"fcn-jax: error: {e}", file=sys.stderr)
        return 2
    except DistributedError as e:  # several processes: one did not join, or died
        print(f"fcn-jax: error: {e}", file=sys.stderr)
        from fcn_jax.distributed import exit_now

        exit_now(3)  # before the runtime, which lost a peer, aborts this process noisily
        return 3
    except KeyboardInterrupt:
        print("fcn-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
