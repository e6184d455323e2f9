"""Training under faults and bad input (`lapvqa_hf.train`): a kill at any instant loses nothing complete and a re-run
resumes, a killed launcher takes its trainer with it, NaN never travels silently, a bad config is reported whole
before any work, and a resumed run applies or refuses config changes explicitly."""

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import TINY_DECODER, prepare_training_release, training_config_values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import get_cosine_schedule_with_warmup

from lapvqa_hf import LapvqaDiffVQAConfig, LapvqaDiffVQAModel
from lapvqa_hf.data import load_mimic_diff_vqa
from lapvqa_hf.features import FeatureError, image_id
from lapvqa_hf.train import NonFiniteError, TrainConfig, TrainConfigError, config_problems, main, train
from lapvqa_hf.train.checkpoints import latest_checkpoint, recover_interrupted_saves, save_best

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fresh_accelerator_state")
config_values = training_config_values


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_training_release(tmp_path_factory.mktemp("faults"))


def config_file(base: Path, output: Path, **changes) -> Path:
    path = output.with_suffix(".json")
    path.write_text(json.dumps(config_values(base, output, **changes)))
    return path


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def equal_weights(a: Path, b: Path) -> bool:
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- kill safety ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("killed", ["while save_state writes", "before the rename"])
def test_a_kill_while_a_checkpoint_is_saved_leaves_no_checkpoint_and_the_rerun_resumes_from_the_one_before(
    prepared, tmp_path, monkeypatch, capsys, killed
):
    uninterrupted = train(TrainConfig(**config_values(prepared, tmp_path / "a")))
    AcceleratorState._reset_state(True)
    original_save_state, original_replace = Accelerator.save_state, os.replace

    def save_state_killed_midway(self, output_dir=None, **kwargs):
        original_save_state(self, output_dir, **kwargs)
        if output_dir.endswith("step-4"):
            (Path(output_dir) / "optimizer.bin").write_bytes(b"half")  # the kill came during this file
            raise KeyboardInterrupt("killed while saving step-4")

    def replace_killed_at_step_4(source, target):
        if str(source).endswith("step-4"):
            raise KeyboardInterrupt("killed before renaming step-4")
        original_replace(source, target)

    if killed == "while save_state writes":
        monkeypatch.setattr(Accelerator, "save_state", save_state_killed_midway)
    else:
        monkeypatch.setattr(os, "replace", replace_killed_at_step_4)
    config = TrainConfig(**config_values(prepared, tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.undo()
    checkpoints = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".partial-step-4", "step-2"]
    assert latest_checkpoint(tmp_path / "b") == (checkpoints / "step-2", 2), "only complete checkpoints count"

    AcceleratorState._reset_state(True)
    capsys.readouterr()
    resumed = train(config)
    printed = capsys.readouterr().out
    assert f"removing {checkpoints / '.partial-step-4'}, left unfinished by an interrupted run" in printed
    assert f"resumed from {checkpoints / 'step-2'}" in printed
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-4", "step-6"]
    assert resumed["losses"] == uninterrupted["losses"][2:]
    assert equal_weights(tmp_path / "a" / "checkpoints" / "step-6", checkpoints / "step-6")


def write_model(folder: Path, content: str) -> None:
    """A stand-in model folder, complete when both its files hold `content`."""
    folder.mkdir()
    (folder / "config.json").write_text(content)
    (folder / "model.safetensors").write_text(content)


def model_in(folder: Path) -> str:
    """The content of a complete stand-in model folder; fails on a partial one."""
    contents = {(folder / name).read_text() for name in ("config.json", "model.safetensors")}
    assert len(contents) == 1 and sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    return contents.pop()


@pytest.mark.parametrize(
    ("killed", "after_rename", "left"),
    [
        ("while writing the new one", None, "old"),
        ("after moving the old one away", 1, "old"),
        ("after moving the new one in", 2, "new"),
    ],
)
def test_a_kill_at_any_instant_of_saving_the_best_model_leaves_a_complete_best_model(
    tmp_path, monkeypatch, killed, after_rename, left
):
    save_best(tmp_path, functools.partial(write_model, content="old"), {"step": 1})
    original_replace, renames = os.replace, itertools.count(1)

    def write_half(folder: Path) -> None:
        folder.mkdir()
        (folder / "config.json").write_text("new")
        raise KeyboardInterrupt(f"killed {killed}")

    def replace(source, target):
        original_replace(source, target)
        if next(renames) == after_rename:
            raise KeyboardInterrupt(f"killed {killed}")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_best(tmp_path, write_half if after_rename is None else functools.partial(write_model, content="new"), {})
    monkeypatch.undo()

    recover_interrupted_saves(tmp_path)  # what the re-run does first
    assert model_in(tmp_path / "best") == left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "best.json"], "no leftovers"
    save_best(tmp_path, functools.partial(write_model, content="newer"), {"step": 3})
    assert model_in(tmp_path / "best") == "newer" and json.loads((tmp_path / "best.json").read_text()) == {"step": 3}


def ended(process: psutil.Process, timeout: float) -> bool:
    """Whether `process` ends within `timeout` seconds (as a zombie, if its new parent does not reap it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def test_killing_accelerate_launch_stops_the_trainer_and_a_rerun_loses_no_checkpoint(prepared, tmp_path):
    config = config_file(prepared, tmp_path / "run", max_steps=100_000, checkpoint_every=10)
    checkpoints = tmp_path / "run" / "checkpoints"
    log = tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lapvqa_hf.train", "--config", str(config)]
    with log.open("w") as stderr:
        launcher = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr, env=os.environ | {"OMP_NUM_THREADS": "1"}
        )
    trainer = None
    try:
        deadline = time.monotonic() + 300
        while not (checkpoints / "step-10").is_dir():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        (trainer,) = psutil.Process(launcher.pid).children()
        complete = {p.name: folder_digest(p) for p in checkpoints.glob("step-*")}
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert ended(trainer, timeout=30), "the trainer trains on as an orphan"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if trainer is not None and not ended(trainer, timeout=0):
            trainer.kill()
    # Whether the trainer noticed first (and said so) or the launcher's own machinery stopped it is a race: the
    # behaviour is what counts, and the watcher's line has its own test below.

    last, step = latest_checkpoint(tmp_path / "run")
    result = train(TrainConfig.from_file(config, [f"max_steps={step + 1}"]))
    assert result["steps"] == step + 1 and len(result["losses"]) == 1, f"resumed from {last}"
    assert all(folder_digest(checkpoints / name) == digest for name, digest in complete.items())
    assert not list(checkpoints.glob(".partial-*"))


_ORPHAN = """
import os, sys, time
os.environ["LOCAL_RANK"] = "0"  # as a launcher sets it
from lapvqa_hf.train import exit_with_launcher
exit_with_launcher(poll_seconds=0.05)
print("watching", flush=True)
time.sleep(600)
"""


def test_a_trainer_whose_launcher_dies_says_so_and_exits(tmp_path):
    """The watcher alone, under a plain parent process: no launcher machinery races it."""
    log = tmp_path / "stderr.txt"
    parent_code = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {_ORPHAN!r}], stdout=open({str(tmp_path / 'out.txt')!r}, 'w'), "
        f"stderr=open({str(log)!r}, 'w'))\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        deadline = time.monotonic() + 120
        while "watching" not in (tmp_path / "out.txt").read_text() if (tmp_path / "out.txt").exists() else True:
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.1)
        (child,) = psutil.Process(parent.pid).children()
        parent.kill()
        parent.wait()
        assert ended(child, timeout=60), "the orphan went on"
    finally:
        if parent.poll() is None:
            parent.kill()
    assert f"error: the launcher (pid {parent.pid}) is gone; stopping. Re-run to resume." in log.read_text()


# --- NaN never travels silently ---------------------------------------------------------------------------------


def test_a_nan_loss_stops_training_at_its_step_and_saves_nothing_of_it(prepared, tmp_path, monkeypatch, capsys):
    original_forward, training_calls = LapvqaDiffVQAModel.forward, itertools.count(1)

    @functools.wraps(original_forward)  # generate() checks its inputs against the signature
    def forward_nan_at_step_3(self, *args, **kwargs):
        output = original_forward(self, *args, **kwargs)
        if self.training and next(training_calls) == 3:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(LapvqaDiffVQAModel, "forward", forward_nan_at_step_3)
    config = config_file(prepared, tmp_path / "run", checkpoint_every=1, eval_every=1)
    assert main(["--config", str(config)]) == 1
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")] == [
        "error: step 3: the training loss is nan; stopped before the update; lower learning_rate or max_grad_norm "
        "(a re-run resumes from the last checkpoint with the new values)."
    ]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert json.loads((tmp_path / "run" / "best.json").read_text())["step"] <= 2
    assert not (tmp_path / "run" / "result.json").exists()


def test_an_infinite_gradient_norm_stops_training_before_the_update(prepared, tmp_path, monkeypatch):
    original_clip, calls = Accelerator.clip_grad_norm_, itertools.count(1)

    def clip_inf_at_step_2(self, parameters, max_norm, norm_type=2):
        norm = original_clip(self, parameters, max_norm, norm_type)
        return torch.tensor(float("inf")) if next(calls) == 2 else norm

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip_inf_at_step_2)
    with pytest.raises(NonFiniteError, match=r"^step 2: the gradient norm is inf; stopped before the update"):
        train(TrainConfig(**config_values(prepared, tmp_path / "run", checkpoint_every=1, eval_every=1)))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-1"]
    assert json.loads((tmp_path / "run" / "best.json").read_text())["step"] == 1


def features_with(prepared: Path, folder: Path, change) -> tuple[Path, str]:
    """A copy of the features where `change(tensors, image)` altered those of the first training image, recorded
    in the manifest as if extracted so."""
    folder.mkdir()
    manifest = json.loads((prepared / "features" / "features.json").read_text())
    row = load_mimic_diff_vqa(prepared / "mimic")["train"][0]
    image = image_id(row["current_image"], (prepared / "mimic").resolve())
    for shard in manifest["shards"]:
        tensors = load_file(prepared / "features" / shard["file"])
        if image in tensors:
            change(tensors, image)
        save_file(tensors, folder / shard["file"])
        shard |= {"ids": list(tensors), "sha256": hashlib.sha256((folder / shard["file"]).read_bytes()).hexdigest()}
    (folder / "features.json").write_text(json.dumps(manifest))
    return folder, image


def test_nan_in_an_images_features_is_an_error_naming_the_image_before_training(prepared, tmp_path):
    features, image = features_with(prepared, tmp_path / "features", lambda t, i: t[i].fill_(float("nan")))
    with pytest.raises(FeatureError, match=f"image '{image}' are NaN or infinite"):
        train(TrainConfig(**config_values(prepared, tmp_path / "run", features_dir=str(features))))
    assert not (tmp_path / "run").exists()


def test_images_without_features_are_an_error_before_training(prepared, tmp_path):
    features, image = features_with(prepared, tmp_path / "features", lambda t, i: t.pop(i))
    with pytest.raises(FeatureError, match=f"has no features for 1 image\\(s\\) of the data, e.g. '{image}'"):
        train(TrainConfig(**config_values(prepared, tmp_path / "run", features_dir=str(features))))
    assert not (tmp_path / "run").exists()


# --- configuration ----------------------------------------------------------------------------------------------

NOWHERE = "/nonexistent/lapvqa"
BAD_VALUES = [
    ({"learnig_rate": 0.1}, "{config}: unknown field 'learnig_rate'; did you mean 'learning_rate'?"),
    ({"learning_rate": "abc"}, "learning_rate='abc': expected a finite number > 0."),
    ({"learning_rate": -0.001}, "learning_rate=-0.001: expected a finite number > 0."),
    ({"weight_decay": -1}, "weight_decay=-1: expected a finite number >= 0."),
    ({"batch_size": 0}, "batch_size=0: expected an integer >= 1."),
    ({"max_steps": 2.5}, "max_steps=2.5: expected an integer >= 1."),
    ({"warmup_steps": -1}, "warmup_steps=-1: expected an integer >= 0."),
    ({"checkpoint_every": 0}, "checkpoint_every=0: expected an integer >= 1."),
    ({"eval_every": True}, "eval_every=True: expected an integer >= 1."),
    ({"max_grad_norm": float("nan")}, "max_grad_norm=nan: expected a finite number > 0."),
    ({"max_grad_norm": float("inf")}, "max_grad_norm=inf: expected a finite number > 0."),
    ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0: expected a finite number > 0."),
    ({"seed": -1}, "seed=-1: expected an integer from 0 to 2**32 - 1."),
    ({"mixed_precision": "fp32"}, "mixed_precision='fp32': expected one of no, bf16, fp16."),
    (
        {"best_metric": "bleu"},
        "best_metric='bleu': expected one of bleu1, bleu2, bleu3, bleu4, rouge1, rougeL, cider, map40, map50, "
        "i2r_recall1, i2r_recall5, i2r_recall10, r2i_recall1, r2i_recall5, r2i_recall10, mean_recall, miou, acc25, "
        "acc50, pointing; did you "
        "mean 'bleu4'?",
    ),
    (
        {"task": "segmentation"},
        "task='segmentation': expected one of diffvqa, captioning, detection, two-tower, report-generation, "
        "grounding; did you mean 'report-generation'?",
    ),
    ({"report_sections": []}, "report_sections=[]: expected a non-empty list of report section names."),
    ({"data_root": NOWHERE}, f"data_root: no folder {NOWHERE}; set it to the dataset release's folder."),
    (
        {"features_dir": NOWHERE},
        f"features_dir: {NOWHERE} has no features.json; run `lapvqa extract-features` first, or fix the path.",
    ),
    (
        {"model": {"hiden_size": 32}},
        "model.hiden_size: unknown field of LapvqaDiffVQAConfig; did you mean 'hidden_size'?",
    ),
    ({"model": {"vis_dim": 64}}, "model.vis_dim: set by training from the features (or vision_encoder); remove it."),
    (
        {"model": {"hidden_size": 30, "num_attention_heads": 4}},
        "model: Class validation error for validator "
        "'validate_architecture': ValueError: hidden_size (30) must be divisible by num_attention_heads (4).",
    ),
    ({"vision_encoder": "encoder"}, "vision_encoder: only used with task captioning; remove it."),
    (
        {"init_from": f"{NOWHERE}/model", "model": {}},
        f"init_from: cannot load {NOWHERE}/model (Repo id must be in "
        f"the form 'repo_name' or 'namespace/repo_name': '{NOWHERE}/model'. Use `repo_type` argument if needed.); set "
        "it to a saved model folder or Hub id.",
    ),
]


@pytest.mark.parametrize(("changes", "expected"), BAD_VALUES, ids=[line[:40] for _, line in BAD_VALUES])
def test_every_bad_config_value_is_one_error_line_naming_its_key_before_any_work(
    prepared, tmp_path, capsys, changes, expected
):
    config = config_file(prepared, tmp_path / "run", **changes)
    assert main(["--config", str(config)]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: {expected.format(config=config)}"]
    assert not (tmp_path / "run").exists()


def test_init_from_must_hold_a_model_of_the_task(prepared, tmp_path):
    LapvqaDiffVQAModel(LapvqaDiffVQAConfig(vis_dim=32, **TINY_DECODER)).save_pretrained(tmp_path / "head")
    changes = dict(init_from=str(tmp_path / "head"), task="captioning", model={"hidden_size": 16})
    with pytest.raises(TrainConfigError) as raised:
        train(TrainConfig(**config_values(prepared, tmp_path / "run", **changes)))
    assert raised.value.problems == [
        f"init_from: {tmp_path / 'head'} holds a lapvqa_diffvqa model, but this task trains lapvqa_captioning models.",
        "model: not used with init_from (the model comes from there); remove one of them.",
    ]


def test_bad_json_names_its_line_and_column(tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text('{"max_steps": 10,\n "batch_size": }')
    assert main(["--config", str(config)]) == 1
    assert capsys.readouterr().err == f"error: {config}: invalid JSON at line 2, column 16: Expecting value.\n"


def test_set_overrides_are_checked_like_the_file_and_all_problems_are_reported_at_once(prepared, tmp_path, capsys):
    values = config_values(prepared, tmp_path / "run", batch_size=0)
    del values["output_dir"]
    config = tmp_path / "train.json"
    config.write_text(json.dumps(values))
    overrides = ["max_step=7", "learning_rate=abc", "seed", "max_grad_norm=NaN", "mixed_precision=bf16"]
    assert main(["--config", str(config), *(arg for o in overrides for arg in ("--set", o))]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: --set max_step: unknown field; did you mean 'max_steps'?",
        "error: --set seed: expected key=value.",
        f"error: {config}: missing field 'output_dir' (required).",
        "error: learning_rate='abc': expected a finite number > 0.",
        "error: batch_size=0: expected an integer >= 1.",
        "error: max_grad_norm=nan: expected a finite number > 0.",
    ]


def test_the_command_reports_a_bad_config_without_a_traceback(prepared, tmp_path):
    config = config_file(prepared, tmp_path / "run", batch_size=0, features_dir=NOWHERE)
    found = subprocess.run(
        [sys.executable, "-m", "lapvqa_hf.train", "--config", str(config), "--set", "learning_rate=-1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert found.returncode == 1 and "Traceback" not in found.stderr
    assert found.stderr.splitlines() == [
        "error: learning_rate=-1: expected a finite number > 0.",
        "error: batch_size=0: expected an integer >= 1.",
        f"error: features_dir: {NOWHERE} has no features.json; run `lapvqa extract-features` first, or fix the path.",
    ]
    assert not (tmp_path / "run").exists()


# --- resuming with another config -------------------------------------------------------------------------------


def test_a_resumed_run_applies_a_new_schedule_and_weight_decay_and_says_so(prepared, tmp_path, capsys):
    train(TrainConfig(**config_values(prepared, tmp_path / "run", max_steps=4, weight_decay=0.01)))
    AcceleratorState._reset_state(True)
    capsys.readouterr()
    train(TrainConfig(**config_values(prepared, tmp_path / "run", max_steps=8, learning_rate=0.02, weight_decay=0.0)))
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if " changed from " in line] == [
        "learning_rate changed from 0.01 to 0.02 since step-4: the learning-rate schedule is rebuilt",
        "weight_decay changed from 0.01 to 0.0 since step-4: applied from now on",
        "max_steps changed from 4 to 8 since step-4: the learning-rate schedule is rebuilt",
    ]
    # At step 6, the resumed run is where a run started with the new values would be.
    reference = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.02)
    schedule = get_cosine_schedule_with_warmup(reference, num_warmup_steps=1, num_training_steps=8)
    for _ in range(6):
        reference.step()
        schedule.step()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-6"
    decayed, undecayed = torch.load(checkpoint / "optimizer.bin", weights_only=True)["param_groups"]
    assert (decayed["lr"], decayed["initial_lr"], decayed["weight_decay"]) == (schedule.get_last_lr()[0], 0.02, 0.0)
    assert undecayed["weight_decay"] == 0.0
    assert json.loads((checkpoint / "train_config.json").read_text())["learning_rate"] == 0.02


def test_a_resumed_run_refuses_changes_it_cannot_apply_before_any_work(prepared, tmp_path, capsys):
    train(TrainConfig(**config_values(prepared, tmp_path / "run", max_steps=4)))
    before = {p.name: folder_digest(p) for p in (tmp_path / "run" / "checkpoints").iterdir()}
    AcceleratorState._reset_state(True)
    capsys.readouterr()
    changes = dict(max_steps=3, batch_size=4, model=TINY_DECODER | {"hidden_size": 64})
    assert main(["--config", str(config_file(prepared, tmp_path / "run", **changes))]) == 1
    checkpoint = tmp_path / "run" / "checkpoints" / "step-4"
    advice = "a resumed run cannot change it: set it back, or train into a new output_dir (with init_from to start "
    assert capsys.readouterr().err.splitlines() == [
        f"error: model: {TINY_DECODER!r} in {checkpoint}, {TINY_DECODER | {'hidden_size': 64}!r} now; {advice}"
        "from a saved model).",
        f"error: max_steps: 3 is below the 4 steps of {checkpoint}; raise it, or train into a new output_dir.",
        f"error: batch_size: 3 in {checkpoint}, 4 now; {advice}from a saved model).",
    ]
    assert {p.name: folder_digest(p) for p in (tmp_path / "run" / "checkpoints").iterdir()} == before


def test_checkpoints_and_the_best_model_get_the_users_umask_permissions(prepared, tmp_path):
    import stat

    previous = os.umask(0o022)
    try:
        train(TrainConfig(**config_values(prepared, tmp_path / "run", max_steps=2, eval_every=2)))
    finally:
        os.umask(previous)
    for folder in (tmp_path / "run" / "checkpoints" / "step-2", tmp_path / "run" / "best"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        assert {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()} == {0o644}, folder
    assert stat.S_IMODE((tmp_path / "run" / "best.json").stat().st_mode) == 0o644


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
FIELD_NAMES = st.sampled_from([f.name for f in dataclasses.fields(TrainConfig)]) | st.text(max_size=10)


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    document=st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=8) | JSON_VALUES,
    overrides=st.lists(st.text(max_size=20), max_size=3),
)
def test_any_config_document_is_accepted_or_refused_one_line_per_problem(tmp_path_factory, document, overrides):
    path = tmp_path_factory.mktemp("config") / "train.json"
    path.write_text(json.dumps(document, allow_nan=True))
    try:
        config = TrainConfig.from_file(path, overrides)
    except TrainConfigError as error:
        assert error.problems and all(problem and "\n" not in problem for problem in error.problems)
    else:
        assert isinstance(config, TrainConfig) and not config_problems(dataclasses.asdict(config))


# --- renamed fields and checking once ---------------------------------------------------------------------------


def test_a_config_is_checked_when_it_is_made_so_that_every_train_config_is_a_valid_one(prepared, tmp_path):
    with pytest.raises(TrainConfigError) as raised:
        TrainConfig(**config_values(prepared, tmp_path / "run", max_steps=0, radiologists="all"))
    assert raised.value.problems == [
        "max_steps=0: expected an integer >= 1.",
        "radiologists: only used with task detection; remove it.",
    ]


def test_the_data_folder_under_its_earlier_name_mimic_root_is_read_with_a_warning(prepared, tmp_path):
    values = config_values(prepared, tmp_path / "run")
    values["mimic_root"] = values.pop("data_root")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(values))
    with pytest.warns(FutureWarning, match="'mimic_root' is now called 'data_root'; rename it"):
        assert TrainConfig.from_file(path).data_root == values["mimic_root"]
    del values["mimic_root"]
    path.write_text(json.dumps(values))
    with pytest.warns(FutureWarning, match="'mimic_root' is now called 'data_root'"):
        assert TrainConfig.from_file(path, [f"mimic_root={prepared / 'mimic'}"]).data_root == str(prepared / "mimic")
    both = [f"data_root={prepared / 'mimic'}", f"mimic_root={prepared / 'mimic'}"]
    with pytest.raises(TrainConfigError) as raised:
        TrainConfig.from_file(path, both)
    assert raised.value.problems == [
        f"{path} (or --set): 'mimic_root' is the earlier name of 'data_root'; keep only 'data_root'."
    ]


def test_a_checkpoint_that_recorded_mimic_root_resumes_and_still_refuses_other_data(prepared, tmp_path, capsys):
    train(TrainConfig(**config_values(prepared, tmp_path / "run", max_steps=2)))
    record = tmp_path / "run" / "checkpoints" / "step-2" / "train_config.json"
    recorded = json.loads(record.read_text())
    recorded["mimic_root"] = recorded.pop("data_root")  # as lapvqa-hf 0.4 recorded it
    record.write_text(json.dumps(recorded))
    AcceleratorState._reset_state(True)
    other = tmp_path / "other-release"
    shutil.copytree(prepared / "mimic", other)
    capsys.readouterr()
    assert main(["--config", str(config_file(prepared, tmp_path / "run", max_steps=4, data_root=str(other)))]) == 1
    assert capsys.readouterr().err.startswith(f"error: data_root: {str((prepared / 'mimic').resolve())!r} in ")
    AcceleratorState._reset_state(True)
    assert train(TrainConfig(**config_values(prepared, tmp_path / "run", max_steps=4)))["steps"] == 4


def test_a_row_without_a_question_is_an_error_before_training(prepared):
    from lapvqa_hf.data import DataError
    from lapvqa_hf.features import FeatureStore
    from lapvqa_hf.train import DiffVQAExamples

    rows = [dict(row) for row in load_mimic_diff_vqa(prepared / "mimic")["train"]]
    rows[1]["question"] = "  "
    with pytest.raises(DataError, match=r"1 row\(s\) of the data have no question, e.g. row 1 \(images .*\); remove"):
        DiffVQAExamples(rows, FeatureStore(prepared / "features"), (prepared / "mimic").resolve())
