"""Entry points behind the root ``test.py`` / ``train.py``: ``-opt FILE`` plus ``--set key.path=value``."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable, List, Optional, Type, TypeVar

from condiquant.config import ConfigError, apply_overrides, from_dict, load_yaml

T = TypeVar("T")


def parse_options(schema: Type[T], argv: Optional[List[str]], prog: str) -> tuple[T, str, str]:
    """Parse ``-opt FILE [--set a.b=v ...]`` into ``schema``; returns (options, file, command line)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("-opt", required=True, help="YAML options file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an option, e.g. --set val.tile=256 (value parsed as YAML); repeatable")
    args = parser.parse_args(argv)
    data = apply_overrides(load_yaml(args.opt), args.set, args.opt)
    command = " ".join(shlex.quote(a) for a in ["python", prog, *(sys.argv[1:] if argv is None else argv)])
    return from_dict(schema, data, f"{args.opt}:"), args.opt, command


def run_cli(job: Callable[[], object]) -> int:
    """Run ``job``; bad input is reported as one line on stderr with exit code 2."""
    try:
        job()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main_test(argv: Optional[List[str]] = None) -> int:
    from condiquant.scoring import run_test
    from condiquant.options import TestOptions

    def job() -> None:
        opts, source, command = parse_options(TestOptions, argv, "test.py")
        run_test(opts, source, command)

    return run_cli(job)


def main_train(argv: Optional[List[str]] = None) -> int:
    from condiquant.options import TrainOptions
    from condiquant.ptq import run_train

    def job() -> None:
        opts, source, command = parse_options(TrainOptions, argv, "train.py")
        run_train(opts, source, command)

    return run_cli(job)
