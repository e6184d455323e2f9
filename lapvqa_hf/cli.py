"""`lapvqa`: the command line of lapvqa-hf, with `hf`-style subcommands.

lapvqa convert diffvqa CHECKPOINT --encoder NAME --output DIR
"""

import argparse
import sys

from . import __version__
from .convert import diffvqa


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lapvqa", description="Transformers-native LAPVQA chest X-ray models.")
    parser.add_argument("--version", action="version", version=f"lapvqa-hf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert = commands.add_parser("convert", help="convert an upstream .pt checkpoint to a Transformers folder")
    models = convert.add_subparsers(dest="model", required=True, metavar="MODEL")
    diffvqa_parser = models.add_parser("diffvqa", help="a DiffVQAHead state dict ({encoder}_best.pt)")
    diffvqa.add_arguments(diffvqa_parser)
    diffvqa_parser.set_defaults(handler=diffvqa.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
