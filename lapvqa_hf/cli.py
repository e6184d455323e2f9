"""`lapvqa`: the command line of lapvqa-hf, with `hf`-style subcommands.

lapvqa convert diffvqa CHECKPOINT --encoder NAME --output DIR
lapvqa convert vqa CHECKPOINT --encoder NAME --output DIR
lapvqa convert captioning model_best.pt --output DIR
lapvqa convert vision-encoder encoder_final.pt --output DIR
lapvqa convert coca-encoder open_clip_pytorch_model.bin --output DIR
lapvqa convert detection siglip.pt --output DIR
lapvqa convert report-generation mae-vit-l16.pt [--native --encoder-checkpoint DIR] --output DIR
lapvqa convert grounding siglip.pt --output DIR
lapvqa answer MODEL --input rows.csv --output answers.jsonl
"""

import argparse
import os
import sys
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError

from lapvqa_cli import COMMANDS, top_level_parser

from .kinds import KINDS
from .messages import run_reporting_errors, summary


def build_parser() -> argparse.ArgumentParser:
    parser, commands = top_level_parser()
    convert = commands.add_parser("convert", help=COMMANDS["convert"])
    models = convert.add_subparsers(dest="model", required=True, metavar="MODEL")
    for kind in KINDS.values():  # `lapvqa convert <command>` of every kind that has a converter
        if kind.converter is None:
            continue
        module = kind.converter_module()
        model_parser = models.add_parser(kind.command, help=kind.converter_help, description=summary(module.__doc__))
        module.add_arguments(model_parser)
        model_parser.set_defaults(handler=module.run)

    pull_parser = commands.add_parser("pull", help=COMMANDS["pull"])
    pull_parser.add_argument("names", nargs="*", help="repo ids or names from the manifest (default: all)")
    pull_parser.add_argument("--upstream", action="store_true", help="the upstream .pt files instead, for conversion")
    pull_parser.add_argument("--revision", help="branch, tag or commit to pin")
    pull_parser.add_argument("--local-dir", type=Path, help="download into this folder instead of the cache")
    pull_parser.add_argument("--cache-dir", type=Path, help="huggingface_hub cache folder")
    pull_parser.add_argument("--offline", action="store_true", help="use the local cache only")
    pull_parser.set_defaults(handler=run_pull)

    push_parser = commands.add_parser("push", help=COMMANDS["push"])
    push_parser.add_argument("names", nargs="*", help="repo ids or names from the manifest (default: all convertible)")
    push_parser.add_argument("--work-dir", type=Path, required=True, help="where converted folders are written")
    push_parser.add_argument("--dry-run", action="store_true", help="print the plan; change nothing on the Hub")
    push_parser.add_argument(
        "--upstream-dir", type=Path, help="take upstream files from DIR/<upstream repo name>/<file> instead of the Hub"
    )
    push_parser.set_defaults(handler=run_push)

    data_parser = commands.add_parser("data", help=COMMANDS["data"])
    data_commands = data_parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    synthesize = data_commands.add_parser(
        "synthesize",
        help="write a small synthetic MIMIC-Diff-VQA + MIMIC-CXR(-JPG) release with reports, or a VinDr-CXR, "
        "MS-CXR, NIH ChestX-ray14 or CheXpert one (same layouts)",
    )
    synthesize.add_argument("--output", type=Path, required=True, help="folder to write the release into")
    synthesize.add_argument(
        "--dataset",
        default="mimic",
        choices=["mimic", "vindr-cxr", "ms-cxr", "nih-cxr14", "chexpert"],
        help="mimic (DiffVQA and captioning; default), vindr-cxr (detection boxes by 3 radiologists per image), "
        "ms-cxr (phrase boxes, for grounding), nih-cxr14 or chexpert (image labels with their official splits, for "
        "`lapvqa probe`)",
    )
    synthesize.add_argument(
        "--subjects",
        type=int,
        default=12,
        help="patients (mimic: 3 questions and 2 reports each; nih-cxr14, chexpert: a few images each), training "
        "images (vindr-cxr) or images (ms-cxr); default 12",
    )
    synthesize.add_argument("--seed", type=int, default=0)
    synthesize.set_defaults(handler=run_synthesize)

    extract = commands.add_parser("extract-features", help=COMMANDS["extract-features"])
    extract.add_argument("--encoder", required=True, help="recipe name, e.g. siglip or lapvqa-vit-l14")
    source = extract.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data-root",
        "--mimic-root",  # its earlier name
        dest="data_root",
        type=Path,
        help="a MIMIC-Diff-VQA release, or with --task detection a VinDr-CXR one, with --task grounding an MS-CXR one "
        "(or `lapvqa data synthesize` output)",
    )
    source.add_argument("--pairs", type=Path, help="a CSV/JSONL file of prior_image, current_image, question, answer")
    source.add_argument("--reports", type=Path, help="a CSV/JSONL file of image, report")
    extract.add_argument(
        "--task",
        default="diffvqa",
        choices=[name for name, kind in KINDS.items() if kind.training_task is not None],
        help="with --data-root: the images of the DiffVQA question pairs, the frontal image of every MIMIC-CXR "
        "report (captioning), or every VinDr-CXR (detection) or MS-CXR (grounding) image, prepared as a detection "
        "or grounding head's image processor does",
    )
    extract.add_argument("--output", type=Path, required=True, help="feature folder (re-running resumes)")
    extract.add_argument("--checkpoint", help="encoder checkpoint (Hub id or folder) instead of the recipe's")
    extract.add_argument("--batch-size", type=int, default=8, help="images per encoder call (default 8)")
    extract.add_argument("--shard-size", type=int, default=256, help="images per safetensors shard (default 256)")
    extract.add_argument(
        "--device", help="cuda, cuda:N or cpu (default: cuda when available; under `accelerate launch`, the process's)"
    )
    extract.set_defaults(handler=run_extract_features)

    evaluate = commands.add_parser(
        "evaluate",
        help=COMMANDS["evaluate"],
        description="Answers (DiffVQA) or reports on (captioning, report generation) a split greedily, or detects its "
        "boxes (detection) or grounds its phrases (grounding), and scores it, from stored features or, for a model "
        "that holds its encoder, from the images. Under `accelerate launch -m lapvqa_hf.cli "
        "evaluate ...` the processes share the split out.",
    )
    evaluate.add_argument(
        "model", help="a DiffVQA, captioning, report-generation, detection or grounding model folder or Hub id"
    )
    evaluate.add_argument(
        "--data-root",
        "--mimic-root",  # its earlier name
        dest="data_root",
        type=Path,
        required=True,
        help="a MIMIC-Diff-VQA / MIMIC-CXR release (detection: VinDr-CXR; grounding: MS-CXR)",
    )
    evaluate.add_argument(
        "--features",
        type=Path,
        help="features of the model's encoder; without it, a model that holds its encoder (captioning, a native "
        "DiffVQA or report head) is scored from the images, read by its own image processor",
    )
    evaluate.add_argument(
        "--split", default="test", choices=["train", "validation", "test"], help="the split to score (default test)"
    )
    evaluate.add_argument("--batch-size", type=int, default=16, help="examples per generate call (default 16)")
    evaluate.add_argument(
        "--max-new-tokens", type=int, default=64, help="most tokens generated per answer or report (default 64)"
    )
    evaluate.add_argument("--output", type=Path, help="also write the scores and answers as JSON here")
    evaluate.add_argument(
        "--bertscore-model",
        help="text tasks: also BERTScore (precision, recall, F1 overall) with this model, a Hub id or local folder "
        "(bert_score's default is roberta-large at --bertscore-layer 17)",
    )
    evaluate.add_argument("--bertscore-layer", type=int, help="the hidden-state layer BERTScore reads (default: last)")
    evaluate.set_defaults(handler=run_evaluate)

    from . import answer

    answer_parser = commands.add_parser("answer", help=COMMANDS["answer"])
    answer.add_arguments(answer_parser)
    answer_parser.set_defaults(handler=answer.run)

    from . import probe

    probe_parser = commands.add_parser("probe", help=COMMANDS["probe"], description=summary(probe.__doc__))
    probe.add_arguments(probe_parser)
    probe_parser.set_defaults(handler=probe.run)

    from . import retrieve

    retrieve_parser = commands.add_parser("retrieve", help=COMMANDS["retrieve"], description=summary(retrieve.__doc__))
    retrieve.add_arguments(retrieve_parser)
    retrieve_parser.set_defaults(handler=retrieve.run)
    return parser


def run_evaluate(args: argparse.Namespace) -> int:
    from .data import DataError
    from .features import FeatureStore
    from .files import write_json_atomically
    from .metrics.bertscore import bertscore, load_bertscore_model
    from .model_folders import load_config, load_model
    from .processes import leave_processes, process_state
    from .train.tasks import check_feature_width, predict_across_processes, task_for_model

    state = process_state()  # under `accelerate launch`, each process generates its share of the split

    def evaluate() -> None:
        task = task_for_model(load_config(args.model))
        model = load_model(task.model_class, args.model).eval().to(state.device)
        splits = task.load_splits(args.data_root)
        if args.split not in splits:
            raise DataError(f"{args.data_root} has no {args.split} split; it has {sorted(splits)}.")
        if args.features is not None:
            features = FeatureStore(args.features)
            check_feature_width(args.model, task.feature_width(model), features)
        elif task.trains_from_pixels and getattr(model, "vision_model", None) is not None:
            features = None  # from the images, through the encoder the model holds
            task.prepare_images_as(args.model)
        else:
            raise ValueError(
                f"--features: {args.model} holds no encoder to read the images with; name the features of its "
                "encoder (`lapvqa extract-features`)."
            )
        examples = task.examples(splits[args.split], features, Path(os.path.abspath(args.data_root)))
        tokenizer = task.tokenizer(model)
        answers = predict_across_processes(task, model, tokenizer, examples, args.batch_size, args.max_new_tokens)
        if not state.is_main_process:
            return
        references = task.references(examples)
        scores = task.score(answers, examples)
        metrics = task.metrics
        if args.bertscore_model:
            if not task.generates_text:
                raise ValueError(f"--bertscore-model scores text; a {task.name} model gives none.")
            bert, bert_tokenizer = load_bertscore_model(args.bertscore_model, state.device)
            scores["overall"].update(bertscore(answers, references, bert, bert_tokenizer, args.bertscore_layer))
            metrics = (*metrics, "bertscore_f1")
        print(f"| {task.group_label} | n | {' | '.join(metrics)} |")
        print(f"|---|---|{'---|' * len(metrics)}")
        for name, row in scores.items():
            values = " | ".join(f"{row[m]:.3f}" if m in row else "-" for m in metrics)  # BERTScore: overall only
            print(f"| {name} | {row['count']} | {values} |")
        if args.output:
            predictions = "answers" if task.generates_text else "detections"
            payload = {"split": args.split, "scores": scores, predictions: answers, "references": references}
            write_json_atomically(args.output, payload)

    return leave_processes(state, run_reporting_errors(evaluate, errors=(ValueError, OSError)))  # incl. DataError


def run_extract_features(args: argparse.Namespace) -> int:
    import dataclasses

    from .data import DataError, load_pairs, load_reports
    from .features import (
        FAILURES,
        FeatureError,
        extract_features,
        images_of,
        read_failures,
        recipe_for,
        resolve_device,
    )
    from .models.encoders import EncoderError, load_encoder
    from .processes import leave_processes, process_state

    state = process_state(args.device)  # under `accelerate launch`, each process encodes its share

    def extract() -> None:
        for option, value in (("--batch-size", args.batch_size), ("--shard-size", args.shard_size)):
            if value < 1:
                raise FeatureError(f"{option} must be a positive number of images, got {value}.")
        device = resolve_device(args.device) if args.device or state.num_processes == 1 else state.device
        recipe = recipe_for(args.encoder)
        if args.checkpoint:  # recorded with the features: training completes a captioning model with this encoder
            recipe = dataclasses.replace(recipe, checkpoint=args.checkpoint)
        task = KINDS[args.task].training_task_class()()  # what its training reads, and how it prepares images
        if args.data_root is not None:
            splits = task.load_splits(args.data_root)
            rows, root = [row for split in splits.values() for row in split], args.data_root
        elif args.reports is not None:
            rows, root = list(load_reports(args.reports)), None
        else:
            rows, root = list(load_pairs(args.pairs)), None
        images = images_of(rows, root=Path(os.path.abspath(root)) if root else None)
        encoder = load_encoder(recipe, args.checkpoint)
        image_processor, preparation = task.feature_image_processor(recipe, args.checkpoint), task.image_preparation
        extract_features(
            images,
            recipe,
            args.output,
            encoder,
            image_processor,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            device=device,
            rank=state.process_index,
            world=state.num_processes,
            barrier=state.wait_for_everyone,
            image_preparation=preparation,
        )
        if not state.is_main_process:
            return
        failures = read_failures(args.output)
        summary = f"{args.output}: {len(images) - len(failures)} images encoded with {recipe.name}"
        if failures:
            listed = "; ".join(f"{failure['image_id']}: {failure['reason']}" for failure in failures[:3])
            more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
            summary += (
                f"; {len(failures)} unreadable images skipped, listed in {args.output / FAILURES} (a re-run retries "
                f"them): {listed}{more}"
            )
        print(summary)

    return leave_processes(state, run_reporting_errors(extract, errors=(DataError, EncoderError, OSError)))


def run_synthesize(args: argparse.Namespace) -> int:
    from .data import DataError, load_mimic_cxr_reports, load_mimic_diff_vqa, write_synthetic_mimic_diff_vqa
    from .detection_data import load_vindr_cxr, write_synthetic_vindr_cxr
    from .grounding_data import load_ms_cxr, write_synthetic_ms_cxr
    from .probe_data import load_probe_dataset, write_synthetic_probe_release

    def synthesize() -> None:
        if args.subjects < 1:
            what = {"vindr-cxr": "training images", "ms-cxr": "images"}.get(args.dataset, "patients")
            raise DataError(f"--subjects must be at least 1 ({what}), got {args.subjects}.")
        if args.dataset == "vindr-cxr":
            root = write_synthetic_vindr_cxr(args.output, num_images=args.subjects, seed=args.seed)
            images = {split: len(rows) for split, rows in load_vindr_cxr(root).items()}
            print(f"wrote {root}: images {images}")
            return
        if args.dataset == "ms-cxr":
            root = write_synthetic_ms_cxr(args.output, num_images=args.subjects, seed=args.seed)
            phrases = {split: len(rows) for split, rows in load_ms_cxr(root).items()}
            print(f"wrote {root}: phrases {phrases}")
            return
        if args.dataset in ("nih-cxr14", "chexpert"):
            root = write_synthetic_probe_release(args.dataset, args.output, num_patients=args.subjects, seed=args.seed)
            images = {split: len(rows.images) for split, rows in load_probe_dataset(args.dataset, root).items()}
            print(f"wrote {root}: images {images}")
            return
        root = write_synthetic_mimic_diff_vqa(args.output, num_subjects=args.subjects, seed=args.seed)
        questions = {split: len(rows) for split, rows in load_mimic_diff_vqa(root).items()}
        reports = {split: len(rows) for split, rows in load_mimic_cxr_reports(root).items()}
        print(f"wrote {root}: questions {questions}, reports {reports}")

    return run_reporting_errors(synthesize, errors=(DataError, OSError))


def run_pull(args: argparse.Namespace) -> int:
    from .collection import ManifestError, load_collection
    from .hub import pull, reaching_the_hub

    def pull_repos() -> None:
        with reaching_the_hub("`lapvqa pull` downloads from it; --offline reads the local cache only"):
            pull(
                load_collection(),
                args.names,
                upstream=args.upstream,
                revision=args.revision,
                local_dir=args.local_dir,
                cache_dir=args.cache_dir,
                offline=args.offline,
            )

    return run_reporting_errors(pull_repos, errors=(ManifestError, OSError, HfHubHTTPError))


def run_push(args: argparse.Namespace) -> int:
    from .collection import ManifestError, load_collection
    from .hub import push, reaching_the_hub

    plans = []

    def push_repos() -> None:
        with reaching_the_hub("`lapvqa push` needs it, --dry-run too: the plan compares with the Hub's repos"):
            plans.append(
                push(load_collection(), args.names, args.work_dir, dry_run=args.dry_run, upstream_dir=args.upstream_dir)
            )

    code = run_reporting_errors(push_repos, errors=(ManifestError, OSError, HfHubHTTPError))
    return 1 if code or plans[0].failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
