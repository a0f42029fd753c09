"""The ``accel`` command: ``accel generate | eval | calibrate | bench``.

Every subcommand runs on the embedded miniature pipeline by default (``--model miniature``) and takes
any local diffusers pipeline folder or hub id (when weights are available) with ``--model``.

Bad input ends with one line on stderr and exit code 2, before any work: every argument that can be checked
(numbers, files, the output, the recipe, the calibration, the CLIP model, the device, the model folder) is
checked before the model loads or the first image is made. Outputs are complete or absent: a folder is written
beside its destination and renamed into place at the end; an existing output is replaced only if accel wrote it.
Torch is imported only inside the commands, so ``accel --help`` answers at once.

This module is the entry point only: the parser and :func:`main`. Each subcommand lives in its own module
(:mod:`.generate`, :mod:`.eval`, :mod:`.calibrate`, :mod:`.bench`: its ``cmd_*`` and its parser), on top of
:mod:`.common` (argument types, checks, model loading); imports go one way, entry -> subcommands -> common, and
nothing imports this module. To replace a shared step in a test, patch it where it lives
(``accel.cli.common.load_model``): the subcommands look it up there.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from accel.errors import AccelError

from . import bench, calibrate, common, eval, generate  # `eval`: the subcommand's module (the builtin is not used here)
from .bench import BENCH_DEFAULT, BENCH_SECTIONS, CURVE_SAMPLERS
from .common import UsageError

__all__ = ["main", "build_parser", "UsageError", "BENCH_SECTIONS", "BENCH_DEFAULT", "CURVE_SAMPLERS"]

# The errors that mean bad input, not a bug, and end as one line with exit code 2: accel's own types, and the
# OS errors a path the user gave causes. FloatingPointError is what accel raises (with a message) when the
# pipeline produced NaN/inf: the model at these settings, not the code. Any other exception is a bug and shows its
# traceback, a bare ValueError included (accel's input checks raise accel.errors.InputError, a ValueError).
USER_ERRORS = (UsageError, AccelError, FloatingPointError, FileNotFoundError, PermissionError, IsADirectoryError,
               NotADirectoryError)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (``accel generate: error: ...``) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="accel", description="Accelerate stock diffusers UNet pipelines: "
                     "feature caching, int8, feature inheritance, long-skip scaling.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (generate, eval, calibrate, bench):
        command.add_parser(sub)
    return parser


def _show_warning(command):
    def show(message, category, filename, lineno, file=None, line=None):
        from accel.errors import AccelWarning

        if issubclass(category, AccelWarning):
            from tqdm.auto import tqdm

            tqdm.write(f"accel {command}: warning: {message}", file=sys.stderr)  # on its own line, beside progress bars
        else:
            print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)

    return show


def _one_line(command: str, e: BaseException) -> int:
    msg = e
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        msg = f"{e.strerror or e}: {e.filename}" if e.filename else e
    print(f"accel {command}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a one-line argparse error
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning(args.command)
            common._threads(getattr(args, "threads", 1))
            args.func(args)
    except USER_ERRORS as e:
        return _one_line(args.command, e)
    except KeyboardInterrupt:
        print("accel: interrupted", file=sys.stderr)
        return 130
    return 0
