"""The `lapvqa` command's entry point. `lapvqa`, `lapvqa --help` and `lapvqa --version` answer at once, without
importing torch and transformers (several seconds); every command runs in `lapvqa_hf.cli`.

It lives outside the `lapvqa_hf` package because importing any module of that package first imports the package,
which registers the models with transformers' Auto classes (and so imports torch and transformers).
"""

import argparse
import sys
from importlib.metadata import version

DESCRIPTION = "Transformers-native LAPVQA chest X-ray models."
COMMANDS = {
    "convert": "convert an upstream .pt checkpoint to a Transformers folder",
    "pull": "download converted repos (or, with --upstream, the raw .pt files)",
    "push": "convert (verified), render cards, upload one commit per repo and fill the collection",
    "data": "datasets for fine-tuning and evaluation",
    "extract-features": "encode every image once with a frozen encoder (resumable)",
    "evaluate": "answer (DiffVQA) or report on (captioning) a split greedily, BLEU/ROUGE/CIDEr; detect (mAP); "
    "ground phrases (mIoU)",
    "answer": "answer a CSV / JSON Lines file of images and questions (batched, resumable, heat maps)",
    "probe": "linear probes of frozen image embeddings (NIH CXR-14, CheXpert): mean AUC",
    "retrieve": "rank a report corpus for each X-ray (or X-rays for each report) with a two-tower model; Recall@K",
}


def top_level_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """`lapvqa` with its commands named (each command's own options are added by `lapvqa_hf.cli`)."""
    parser = argparse.ArgumentParser(prog="lapvqa", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lapvqa-hf {version('lapvqa-hf')}")
    return parser, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):  # help, version, or a usage error: no command to import
        parser, commands = top_level_parser()
        for name, help_text in COMMANDS.items():
            commands.add_parser(name, help=help_text)
        parser.parse_args(argv)
    from lapvqa_hf.cli import main as run_command

    return run_command(argv)


if __name__ == "__main__":
    sys.exit(main())
