"""`accelerate launch -m lapvqa_hf.train --config train.json [--set key=value ...]`: reads the config, trains, and
writes `result.json`; under a launcher, exits with it."""

import argparse
import contextlib
import os
import sys
import threading
import time
from pathlib import Path

from ..messages import first_line, summary
from .checkpoints import write_json
from .config import TrainConfig, TrainConfigError, config_fields_help
from .loop import train


def exit_with_launcher(poll_seconds: float = 1.0) -> None:
    """Under a launcher (`accelerate launch`, torchrun), exits this process when the launcher dies rather than
    training on as an orphan; a re-run of the command resumes from the last checkpoint."""
    if "LOCAL_RANK" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" not in os.environ:  # both set by launchers
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        with contextlib.suppress(OSError):
            print(f"error: the launcher (pid {launcher}) is gone; stopping. Re-run to resume.", file=sys.stderr)
            sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="accelerate launch -m lapvqa_hf.train",
        description=summary(sys.modules[__package__].__doc__),
        epilog=config_fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, type=Path, help="JSON file of TrainConfig fields")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override a field: key=value")
    args = parser.parse_args(argv)
    exit_with_launcher()
    try:
        config = TrainConfig.from_file(args.config, args.overrides)
        result = train(config)
    except TrainConfigError as error:
        if os.environ.get("RANK", "0") == "0":  # every process finds the same problems: one of them reports
            for problem in error.problems:
                print(f"error: {problem}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:  # incl. NonFiniteError, DataError, FeatureError
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 1
    if result["is_main_process"]:
        result_path = Path(config.output_dir) / "result.json"
        write_json(result_path, {k: result[k] for k in ("steps", "losses", "best", "num_processes")})
        print(f"done: {result['steps']} steps; results in {result_path}")
    return 0
