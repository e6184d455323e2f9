"""`lapvqa`: the command line of lapvqa-hf, with `hf`-style subcommands.

lapvqa convert diffvqa CHECKPOINT --encoder NAME --output DIR
lapvqa convert captioning model_best.pt --output DIR
lapvqa convert vision-encoder encoder_final.pt --output DIR
"""

import argparse
import sys

from . import __version__
from .convert import captioning, diffvqa, vision_encoder

CONVERTERS = {
    "diffvqa": (diffvqa, "a DiffVQAHead state dict ({encoder}_best.pt)"),
    "captioning": (captioning, "the captioning model (model_best.pt: ViT-L/14 + report decoder)"),
    "vision-encoder": (vision_encoder, "the captioning-pretrained ViT-L/14 alone (encoder_final.pt)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lapvqa", description="Transformers-native LAPVQA chest X-ray models.")
    parser.add_argument("--version", action="version", version=f"lapvqa-hf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert = commands.add_parser("convert", help="convert an upstream .pt checkpoint to a Transformers folder")
    models = convert.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, (module, help_text) in CONVERTERS.items():
        model_parser = models.add_parser(name, help=help_text, description=module.__doc__.split("\n")[0])
        module.add_arguments(model_parser)
        model_parser.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
