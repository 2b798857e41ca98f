"""Every command line of the project, on one parser (``-opt FILE`` plus ``--set key.path=value``): the root
``train.py`` / ``test.py``, the ``condiquant-*`` console scripts (setup.py) and the thin ``scripts/*.py``."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable, List, Optional, Type, TypeVar

from condiquant.config import ConfigError, apply_overrides, from_dict, load_yaml

T = TypeVar("T")


def option_parser(prog: str, opt_required: bool = True, default_opt: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser every command shares: ``-opt FILE`` and repeatable ``--set key.path=value``."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("-opt", required=opt_required and default_opt is None, default=default_opt,
                        help="YAML options file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an option, e.g. --set val.tile=256 (value parsed as YAML); repeatable")
    return parser


def command_line(prog: str, argv: Optional[List[str]]) -> str:
    return " ".join(shlex.quote(a) for a in ["python", prog, *(sys.argv[1:] if argv is None else argv)])


def load_options(schema: Type[T], opt: str, sets: List[str]) -> T:
    return from_dict(schema, apply_overrides(load_yaml(opt), sets, opt), f"{opt}:")


def parse_options(schema: Type[T], argv: Optional[List[str]], prog: str) -> tuple[T, str, str]:
    """Parse ``-opt FILE [--set a.b=v ...]`` into ``schema``; returns (options, file, command line)."""
    args = option_parser(prog).parse_args(argv)
    return load_options(schema, args.opt, args.set), args.opt, command_line(prog, argv)


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


def main_quickstart(argv: Optional[List[str]] = None) -> int:
    from condiquant.options import TrainOptions
    from condiquant.quickstart import quickstart

    def job() -> None:
        args = option_parser("scripts/quickstart.py", default_opt="options/quickstart.yml").parse_args(argv)
        opts = load_options(TrainOptions, args.opt, args.set)
        quickstart(opts, args.opt, command_line("scripts/quickstart.py", argv))

    return run_cli(job)


def main_reproduce(argv: Optional[List[str]] = None) -> int:
    import json

    from condiquant.grid import check, run_table

    parser = option_parser("scripts/reproduce.py")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="re-run N random cached runs and compare (N >= 2: a bridge for older code)")
    parser.add_argument("--seed", type=int, default=None, help="which runs --check picks (default: random)")
    parser.add_argument("--cached", action="store_true",
                        help="compute nothing: write the table from cached runs, list the missing cells as pending")

    def job() -> None:
        args = parser.parse_args(argv)
        command = command_line("scripts/reproduce.py", argv)
        if args.check:
            print(json.dumps(check(args.opt, args.set, args.check, command, args.seed), indent=1))
        else:
            print(run_table(args.opt, args.set, command, cached=args.cached).read_text())

    return run_cli(job)


def main_export(argv: Optional[List[str]] = None) -> int:
    from condiquant.deploy.export import main

    parser = option_parser("scripts/export.py", opt_required=False)
    parser.add_argument("--checkpoint", help="a quantized checkpoint (instead of -opt's experiment)")
    parser.add_argument("--format", choices=["packed", "onnx"], default="packed")
    parser.add_argument("--out")
    parser.add_argument("--tile", type=int, default=None, help="onnx: fixed LR tile (needed for EMT / SwinIR)")
    parser.add_argument("--scale", type=int, default=0, help="onnx: the scale, if network_g has no upscale")
    parser.add_argument("--quantize-outputs", action="store_true",
                        help="onnx: 8-bit Q/DQ on quantized layers' outputs (integer convolutions in ONNX Runtime)")
    parser.add_argument("--float-outputs", type=int, default=2,
                        help="onnx, with --quantize-outputs: leave this many layers' outputs float, those whose "
                             "8-bit rounding costs most on calibration crops")
    return run_cli(lambda: main(parser.parse_args(argv)))


def main_infer_onnx(argv: Optional[List[str]] = None) -> int:
    from condiquant.deploy.infer import main

    parser = argparse.ArgumentParser(prog="scripts/infer_onnx.py")
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    return run_cli(lambda: main(parser.parse_args(argv)))


def main_compare(argv: Optional[List[str]] = None) -> int:
    from condiquant.figures import main

    return run_cli(lambda: main(sys.argv[1:] if argv is None else argv))
