"""What a Transformers user expects of `lapvqa_hf.train` at scale: validation and `lapvqa evaluate` shared across
processes (the same scores and answers as one process), checkpoint rotation, no weight decay on biases, LayerNorm
weights and embeddings, a progress bar, trackers, and every option shown in `--help` and the guide."""

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import TINY_DECODER, accelerate_launch, prepare_training_release, training_config_values

import lapvqa_hf.train.loop as training
from lapvqa_hf import LapvqaDiffVQAConfig, LapvqaDiffVQAModel
from lapvqa_hf.cli import main as lapvqa
from lapvqa_hf.processes import leave_processes
from lapvqa_hf.train import TrainConfig, config_problems, main, parameter_groups, train
from lapvqa_hf.train.checkpoints import PARTIAL, rotate_checkpoints

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "fine-tuning.md"


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")
config_values = training_config_values


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_training_release(tmp_path_factory.mktemp("scaling"))


def launch_two_cpu_processes(module: str, *args: str) -> subprocess.CompletedProcess:
    result = accelerate_launch(module, list(args), processes=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# --- evaluation across processes --------------------------------------------------------------------------------


@pytest.mark.slow
def test_validation_and_evaluate_on_two_processes_equal_one_process(prepared, tmp_path, capsys):
    values = config_values(prepared, tmp_path / "run", max_steps=20, eval_every=10, checkpoint_every=10)
    (tmp_path / "run.json").write_text(json.dumps(values | {"eval_max_new_tokens": 16}))
    launch_two_cpu_processes("lapvqa_hf.train", "--config", str(tmp_path / "run.json"))
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    assert summary["num_processes"] == 2

    evaluate = ["evaluate", str(tmp_path / "run" / "best"), "--data-root", str(prepared / "mimic")]
    evaluate += ["--features", str(prepared / "features"), "--max-new-tokens", "16", "--batch-size", "4"]
    # The best model's validation scores, generated on 2 processes in training, are those of 1 process.
    assert lapvqa([*evaluate, "--split", "validation", "--output", str(tmp_path / "one-validation.json")]) == 0
    one = json.loads((tmp_path / "one-validation.json").read_text())
    assert one["scores"] == summary["best"]["scores"]

    # `lapvqa evaluate` under accelerate launch: the same answers and scores as 1 process, printed once.
    assert lapvqa([*evaluate, "--split", "train", "--output", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    result = launch_two_cpu_processes(
        "lapvqa_hf.cli", *evaluate, "--split", "train", "--output", str(tmp_path / "two.json")
    )
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert len(two["answers"]) == 18 and two["answers"] == one["answers"] and two["scores"] == one["scores"]
    assert two["references"] == one["references"] and len(set(two["answers"])) > 1
    assert result.stdout.count("| overall | 18 |") == 1


# --- checkpoint rotation ----------------------------------------------------------------------------------------


def test_save_total_limit_keeps_the_newest_checkpoints_and_the_one_resumed_from(prepared, tmp_path):
    output = tmp_path / "run"
    train(TrainConfig(**config_values(prepared, output, save_total_limit=2)))
    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-4", "step-6"]
    assert json.loads((checkpoints / "step-6" / "train_config.json").read_text())["save_total_limit"] == 2

    AcceleratorState._reset_state(True)
    resumed = train(TrainConfig(**config_values(prepared, output, save_total_limit=1, max_steps=10)))
    assert resumed["steps"] == 10
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-10", "step-6"]  # step-6: resumed from


def test_rotation_never_deletes_partial_checkpoints_and_keeps_all_without_a_limit(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in ("step-2", "step-4", "step-10", f"{PARTIAL}step-12", "step-8"):
        (checkpoints / name).mkdir(parents=True)
    assert rotate_checkpoints(tmp_path, None) == []
    deleted = rotate_checkpoints(tmp_path, 2, keep=checkpoints / "step-2")
    assert deleted == [checkpoints / "step-4"]
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"{PARTIAL}step-12", "step-10", "step-2", "step-8"]


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_save_total_limit_is_validated(value):
    assert config_problems({"save_total_limit": value}) == [
        f"save_total_limit={value!r}: expected an integer >= 1, or null to keep all."
    ]
    assert config_problems({"save_total_limit": None}) == config_problems({"save_total_limit": 3}) == []


# --- weight decay -----------------------------------------------------------------------------------------------


def test_no_weight_decay_on_biases_layer_norms_and_embeddings():
    model = LapvqaDiffVQAModel(LapvqaDiffVQAConfig(vis_dim=32, **TINY_DECODER))
    decayed, undecayed = parameter_groups(model, 0.05)
    assert (decayed["weight_decay"], undecayed["weight_decay"]) == (0.05, 0.0)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert {names[id(p)] for p in undecayed["params"]} | decayed_names == set(names.values())
    modules = dict(model.named_modules())
    for name in names.values():
        module_name, _, kind = name.rpartition(".")
        module = modules[module_name]
        expected = kind == "weight" and not isinstance(module, torch.nn.LayerNorm | torch.nn.Embedding)
        assert (name in decayed_names) == expected, name
    assert "decoder.layers.0.fc1.weight" in decayed_names and "decoder.embed_tokens.weight" not in decayed_names


def test_a_checkpoint_of_one_optimizer_group_resumes_decaying_every_parameter(prepared, tmp_path, monkeypatch, capsys):
    def one_group(model, weight_decay):
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]

    monkeypatch.setattr(training, "parameter_groups", one_group)  # as lapvqa-hf saved checkpoints before
    train(TrainConfig(**config_values(prepared, tmp_path / "run", max_steps=2)))
    monkeypatch.undo()
    AcceleratorState._reset_state(True)
    capsys.readouterr()
    resumed = train(TrainConfig(**config_values(prepared, tmp_path / "run", max_steps=4, weight_decay=0.5)))
    assert resumed["steps"] == 4
    assert "decays every parameter: resuming so" in capsys.readouterr().out
    (group,) = torch.load(tmp_path / "run" / "checkpoints" / "step-4" / "optimizer.bin", weights_only=True)[
        "param_groups"
    ]
    assert group["weight_decay"] == 0.5


# --- progress bar and trackers ----------------------------------------------------------------------------------


def test_training_logs_to_trackers_and_shows_progress(prepared, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, name, config=None: calls.append(("init", name)))
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None: calls.append(("log", step, values)))
    monkeypatch.setattr(Accelerator, "end_training", lambda self: calls.append(("end",)))
    train(TrainConfig(**config_values(prepared, tmp_path / "run", max_steps=4, eval_every=4, checkpoint_every=4)))
    assert calls[0] == ("init", "lapvqa-diffvqa") and calls[-1] == ("end",)
    logged = [call for call in calls if call[0] == "log"]
    train_logs = [values for _, _, values in logged if "train/loss" in values]
    assert [step for _, step, values in logged if "train/loss" in values] == [1, 2, 3, 4]
    assert all(values.keys() == {"train/loss", "train/lr", "train/tokens_per_second"} for values in train_logs)
    assert all(values["train/tokens_per_second"] > 0 for values in train_logs)
    evaluated = [(step, values) for _, step, values in logged if "eval/bleu4" in values]
    assert len(evaluated) == 1 and evaluated[0][0] == 4
    err = capsys.readouterr().err
    assert "training diffvqa" in err and "4/4" in err
    assert re.search(r"loss=\d+\.\d{4}, lr=[\d.e+-]+, tokens_s=\d+", err)


# --- every option documented ------------------------------------------------------------------------------------


def test_every_config_field_is_in_help_and_in_the_guide_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    guide = GUIDE.read_text()
    for f in dataclasses.fields(TrainConfig):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            default = "required"
        else:
            default = json.dumps(f.default if f.default is not dataclasses.MISSING else f.default_factory())
        assert re.search(rf"^  {f.name}: .*; (default )?{re.escape(default)}$", shown, re.M), f.name
        assert f"| `{f.name}` | `{default}` |" in guide or f"| `{f.name}` | {default} |" in guide, f.name
    with pytest.raises(SystemExit):
        lapvqa(["evaluate", "--help"])
    shown = capsys.readouterr().out
    for option, default in (("--split", "test"), ("--batch-size", "16"), ("--max-new-tokens", "64")):
        assert re.search(rf"{option} .*\(default {default}\)", " ".join(shown.split())), option


class RecordingState:
    """A stand-in for accelerate's `PartialState` that records the barriers it is asked for."""

    def __init__(self) -> None:
        self.barriers = 0

    def wait_for_everyone(self) -> None:
        self.barriers += 1


@pytest.fixture
def process_group(tmp_path):
    """A real one-process gloo group, as `accelerate launch` gives each process (destroyed if a test leaves it)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_a_command_that_succeeded_waits_for_the_others_and_leaves_the_process_group(process_group):
    """Left to interpreter exit, gloo's threads can abort a process that succeeded (SIGABRT, "terminate called
    without an active exception"): `lapvqa evaluate`, `extract-features` and `answer` leave the group themselves."""
    state = RecordingState()
    assert leave_processes(state, 0) == 0
    assert state.barriers == 1 and not torch.distributed.is_initialized()


def test_a_command_that_failed_neither_waits_nor_leaves(process_group):
    """The other processes may be inside a collective: waiting or destroying would hang; the launcher stops them."""
    state = RecordingState()
    assert leave_processes(state, 1) == 1
    assert state.barriers == 0 and torch.distributed.is_initialized()


def test_a_single_process_run_has_no_group_to_leave():
    state = RecordingState()
    assert leave_processes(state, 0) == 0
    assert state.barriers == 0
