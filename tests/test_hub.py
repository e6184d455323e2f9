"""`lapvqa push` and `lapvqa pull` without the network: a local Hub-compatible server and a recording HfApi."""

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import upstream_detection_checkpoint, upstream_grounding_checkpoint, upstream_report_checkpoint
from hub_server import LocalHub
from huggingface_hub import HfApi
from lapvqa_hf.convert import diffvqa
from lapvqa_hf.convert.original import (
    CaptioningModel,
    CocaVisionTower,
    ContrastiveModel,
    DetectionHead,
    DiffVQAHead,
    ReportGenerationHead,
    VisualGroundingHead,
    VQAHead,
    randomize_,
)

from lapvqa_hf.collection import load_collection
from lapvqa_hf.hub import describe, execute, plan_push, push
from lapvqa_hf.models.text_towers import text_recipe_for

SECRET = "hf_sentinelTOKENthatMustNeverBePrinted"
# Every manifest entry converts (the exact list is specified in test_collection_cards.py).
CONVERTIBLE = [m.name for m in load_collection().select(convertible_only=True)]
# One repo of every kind: what the in-process push tests publish (the CLI dry run covers the full manifest).
ONE_PER_KIND = [
    "lapvqa-diffvqa-coca",
    "lapvqa-captioning",
    "lapvqa-vit-l14",
    "lapvqa-coca-vit-l14",
    "lapvqa-vqa-siglip",
    "lapvqa-ad-mae-vit-l16",
    "lapvqa-sigmoid",
    "lapvqa-rrg-native-siglip",
    "lapvqa-pg-owlv2",
]


def _checkpoint_bytes(checkpoint: torch.nn.Module | dict) -> bytes:
    """A module's state dict, or a checkpoint dict as it is, as `torch.save` writes it."""
    buffer = io.BytesIO()
    torch.save(checkpoint.state_dict() if isinstance(checkpoint, torch.nn.Module) else checkpoint, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def upstream_repos() -> dict[str, dict[str, bytes]]:
    """Random-weight upstream files, upstream layout and real feature widths, small decoders (8 heads divide 64)."""
    collection = load_collection()
    repos: dict[str, dict[str, bytes]] = {}
    for entry in collection.select(convertible_only=True):
        if entry.kind in ("diffvqa", "vqa"):
            head_class = DiffVQAHead if entry.kind == "diffvqa" else VQAHead
            head = head_class(vis_dim=entry.vis_dim, d_model=64, num_layers=2, dim_feedforward=96)
            repos.setdefault(entry.source.repo_id, {})[entry.source.filename] = _checkpoint_bytes(randomize_(head))
        elif entry.kind == "detection":
            head = randomize_(DetectionHead(vis_dim=entry.vis_dim, d_model=32, dim_feedforward=48))
            checkpoint = _checkpoint_bytes(upstream_detection_checkpoint(head, entry.encoder))
            repos.setdefault(entry.source.repo_id, {})[entry.source.filename] = checkpoint
        elif entry.kind == "coca-vision-encoder":  # a whole open_clip CoCa checkpoint; the converter's default heads
            tower = CocaVisionTower(image_size=56, patch_size=28, width=64, layers=1, heads=16, attn_pooler_queries=5)
            checkpoint = {f"visual.{key}": tensor for key, tensor in randomize_(tower).state_dict().items()}
            checkpoint = _checkpoint_bytes({**checkpoint, "logit_scale": torch.tensor(4.6)})
            repos.setdefault(entry.source.repo_id, {})[entry.source.filename] = checkpoint
    captioning = randomize_(
        CaptioningModel(
            img_size=56, vision_width=64, vision_depth=2, d_model=32, num_layers=2, dim_feedforward=48, max_len=60
        )
    )
    repos["dmusingu/lapvqa-pretrain-captioning"] = {
        "model_best.pt": _checkpoint_bytes(captioning),
        "encoder_final.pt": _checkpoint_bytes(captioning.vision_encoder),
    }
    two_tower = dict(img_size=56, vision_width=64, vision_depth=1, text_width=32, text_depth=1, text_ffn=48)
    for repo in ("dmusingu/lapvqa-pretrain-contrastive", "dmusingu/lapvqa-pretrain-sigmoid"):
        model = randomize_(ContrastiveModel(**two_tower, text_max_len=24, embed_dim=16, sigmoid="sigmoid" in repo))
        repos[repo] = {
            "model_best.pt": _checkpoint_bytes(model),
            "encoder_final.pt": _checkpoint_bytes(model.vision_encoder),
        }
    for entry in collection.select(convertible_only=True):
        files = repos.setdefault(entry.source.repo_id, {})
        if entry.kind == "two-tower" and entry.source.filename.startswith("model_epoch"):  # a training checkpoint
            model = randomize_(ContrastiveModel(**two_tower, text_max_len=24, embed_dim=16, sigmoid=True))
            files[entry.source.filename] = _checkpoint_bytes({"epoch": 10, "model": model.state_dict()})
        elif entry.kind == "report-generation":
            head = randomize_(ReportGenerationHead(entry.vis_dim, d_model=64, num_layers=2, dim_feedforward=96))
            files[entry.source.filename] = _checkpoint_bytes(upstream_report_checkpoint(head, entry.encoder))
        elif entry.kind == "grounding":
            text_width = text_recipe_for(entry.encoder).text_dim
            head = randomize_(VisualGroundingHead(entry.vis_dim, text_width, d_model=32, dim_feedforward=48))
            files[entry.source.filename] = _checkpoint_bytes(upstream_grounding_checkpoint(head, entry.encoder))
    return repos


class RecordingHfApi(HfApi):
    """Reads go over HTTP to the local server; writes are recorded and applied to its in-memory repos."""

    def __init__(self, hub: LocalHub):
        super().__init__(endpoint=hub.url)
        self.hub = hub
        self.calls: list[tuple] = []
        self.collections: dict[str, SimpleNamespace] = {}
        self.fail_uploads = False

    def create_repo(self, repo_id, *, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id))
        self.hub.repos.setdefault(repo_id, {})

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, delete_patterns=None, **kwargs):
        self.calls.append(("upload_folder", repo_id, commit_message))
        if self.fail_uploads:
            raise OSError("upload interrupted")
        files = {
            p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()
        }
        kept = {k: v for k, v in self.hub.repos[repo_id].items() if k not in (delete_patterns or [])}
        self.hub.repos[repo_id] = {**kept, **files}  # the whole commit lands at once

    def list_collections(self, *, owner=None, limit=None, **kwargs):
        self.calls.append(("list_collections", owner))
        return [c for c in self.collections.values() if c.owner == owner]

    def get_collection(self, collection_slug, **kwargs):
        return self.collections[collection_slug]

    def create_collection(self, title, *, namespace=None, exists_ok=False, **kwargs):
        self.calls.append(("create_collection", title, namespace))
        slug = f"{namespace}/{title.lower()}-0123456789abcdef"
        self.collections[slug] = SimpleNamespace(slug=slug, title=title, owner=namespace, items=[])
        return self.collections[slug]

    def add_collection_item(self, collection_slug, item_id, item_type, *, exists_ok=False, **kwargs):
        self.calls.append(("add_collection_item", collection_slug, item_id))
        self.collections[collection_slug].items.append(SimpleNamespace(item_id=item_id, item_type=item_type))

    def writes(self) -> list[tuple]:
        return [c for c in self.calls if c[0] not in ("list_collections",)]


@pytest.fixture(autouse=True)
def online_to_localhost_only(monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1; these tests go online, but only to the server on 127.0.0.1."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(upstream_repos):
    with LocalHub({repo: dict(files) for repo, files in upstream_repos.items()}) as server:
        yield server


@pytest.fixture
def api(hub):
    return RecordingHfApi(hub)


QUIET = dict(log=lambda _: None)


def test_dry_run_plans_every_chosen_repo_and_writes_nothing(hub, api, tmp_path):
    collection = load_collection()
    plan = plan_push(collection, ONE_PER_KIND, tmp_path / "work", api=api, **QUIET)
    assert [r.entry.name for r in plan.repos] == ONE_PER_KIND
    assert not plan.failed and plan.collection_slug is None
    for repo in plan.repos:
        assert repo.create_repo and repo.needs_commit and repo.add_to_collection
        names = {f.path for f in repo.files}
        assert {"README.md", "config.json", "model.safetensors"} <= names
        safetensors = next(f for f in repo.files if f.path == "model.safetensors")
        assert safetensors.size == (repo.folder / "model.safetensors").stat().st_size and len(safetensors.sha256) == 64
        assert f"+++ {repo.entry.repo_id}/README.md (new)" in repo.card_diff
    text = describe(plan)
    assert "● dmusingu/lapvqa-diffvqa-coca: create repo, one commit" in text
    assert "collection LAPVQA (to be created): add" in text
    assert text.endswith(
        f"{len(ONE_PER_KIND)} repo(s) ready, {len(ONE_PER_KIND)} commit(s), {len(ONE_PER_KIND)} collection addition(s), 0 failed."
    )
    assert api.writes() == []


@pytest.mark.slow
def test_push_publishes_then_rerun_is_a_no_op(hub, api, tmp_path):
    collection = load_collection()
    push(collection, ONE_PER_KIND, tmp_path / "first", api=api, **QUIET)
    uploads = [c for c in api.calls if c[0] == "upload_folder"]
    assert [c[1] for c in uploads] == [f"dmusingu/{n}" for n in ONE_PER_KIND], "one commit per repo"
    assert sum(c[0] == "create_collection" for c in api.calls) == 1
    (collection_state,) = api.collections.values()
    assert [i.item_id for i in collection_state.items] == [f"dmusingu/{n}" for n in ONE_PER_KIND]
    card = hub.repos["dmusingu/lapvqa-diffvqa-coca"]["README.md"].decode()
    assert "model-index:" in card and "verify passed" in card

    api.calls.clear()
    plan = push(collection, ONE_PER_KIND, tmp_path / "second", api=api, **QUIET)
    assert api.writes() == [], "re-running must not commit or touch the collection"
    assert all(not r.needs_commit and not r.add_to_collection and not r.card_diff for r in plan.repos)
    assert "no commit (up to date)" in describe(plan) and "already listed" in describe(plan)


def with_first_result(collection, name: str, value: float):
    """The collection with one entry's first reported metric changed (so its card changes)."""
    entry = collection.select([name])[0]
    changed = dataclasses.replace(
        entry, results=(dataclasses.replace(entry.results[0], value=value), *entry.results[1:])
    )
    return dataclasses.replace(collection, models=tuple(changed if m is entry else m for m in collection.models))


def test_a_changed_card_is_one_commit_of_the_card_alone(hub, api, tmp_path):
    collection = load_collection()
    push(collection, ["lapvqa-diffvqa-coca"], tmp_path / "first", api=api, **QUIET)
    collection = with_first_result(collection, "lapvqa-diffvqa-coca", 0.25)
    api.calls.clear()
    plan = push(collection, ["lapvqa-diffvqa-coca"], tmp_path / "second", api=api, **QUIET)
    (repo,) = plan.repos
    assert [(f.path, f.change) for f in repo.files if f.change != "same"] == [("README.md", "update")]
    assert "-      value: 0.196" in repo.card_diff and "+      value: 0.25" in repo.card_diff
    assert [c[0] for c in api.writes()] == ["upload_folder"]


def test_a_repo_failing_verification_is_never_pushed(hub, api, tmp_path, monkeypatch):
    real = diffvqa.CONVERTER.convert_state_dict

    def corrupt_coca(state_dict, config):
        converted = real(state_dict, config)
        if config.encoder_name == "coca":
            converted["decoder.layers.0.fc1.bias"] = converted["decoder.layers.0.fc1.bias"] + 0.5
        return converted

    monkeypatch.setattr(diffvqa.CONVERTER, "convert_state_dict", corrupt_coca)
    plan = push(
        load_collection(), ["lapvqa-diffvqa-coca", "lapvqa-diffvqa-siglip"], tmp_path / "work", api=api, **QUIET
    )
    assert [r.entry.name for r in plan.failed] == ["lapvqa-diffvqa-coca"]
    assert "verify FAILED" in plan.failed[0].error
    pushed = {c[1] for c in api.calls if c[0] in ("upload_folder", "create_repo", "add_collection_item")}
    assert "dmusingu/lapvqa-diffvqa-coca" not in pushed and "dmusingu/lapvqa-diffvqa-siglip" in pushed
    assert "dmusingu/lapvqa-diffvqa-coca" not in hub.repos


def test_a_failed_upload_leaves_the_previous_revision(hub, api, tmp_path):
    collection = load_collection()
    push(collection, ["lapvqa-vit-l14"], tmp_path / "first", api=api, **QUIET)
    before = dict(hub.repos["dmusingu/lapvqa-vit-l14"])
    collection = with_first_result(collection, "lapvqa-vit-l14", 0.7)
    plan = plan_push(collection, ["lapvqa-vit-l14"], tmp_path / "second", api=api, **QUIET)
    assert plan.repos[0].needs_commit
    api.fail_uploads = True
    with pytest.raises(OSError, match="upload interrupted"):
        execute(plan, collection, api=api, **QUIET)
    assert hub.repos["dmusingu/lapvqa-vit-l14"] == before


def test_the_token_never_appears_in_output_or_logs(hub, api, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level("DEBUG")
    push(load_collection(), ["lapvqa-diffvqa-siglip"], tmp_path / "work", api=api)
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text


def _cli(hub: LocalHub, *args: str, cwd: Path, offline: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": SECRET, "HF_HOME": str(cwd / "hf-home")}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "lapvqa_hf.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_an_upstream_file_missing_on_the_hub_fails_its_repo_in_one_line_and_the_others_go_on(upstream_repos, tmp_path):
    repos = {repo: dict(files) for repo, files in upstream_repos.items()}
    del repos["laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k"]
    with LocalHub(repos) as server:
        names = ["lapvqa-coca-vit-l14", "lapvqa-vit-l14"]
        plan = plan_push(load_collection(), names, tmp_path / "work", api=RecordingHfApi(server), **QUIET)
    (failed,) = plan.failed
    assert failed.entry.name == "lapvqa-coca-vit-l14" and "\n" not in failed.error
    assert failed.error.startswith(
        "upstream file laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k/open_clip_pytorch_model.bin could not "
        "be fetched ("
    )
    assert [r.entry.name for r in plan.repos if r.error is None] == ["lapvqa-vit-l14"]


@pytest.mark.slow
def test_push_dry_run_cli_over_http_on_the_full_manifest(hub, tmp_path):
    result = _cli(hub, "push", "--dry-run", "--work-dir", str(tmp_path / "work"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in CONVERTIBLE:
        assert f"● dmusingu/{name}: create repo, one commit" in result.stdout
    n = len(CONVERTIBLE)
    assert f"{n} repo(s) ready, {n} commit(s), {n} collection addition(s), 0 failed." in result.stdout
    assert SECRET not in result.stdout + result.stderr
    assert not any(method not in ("GET", "HEAD") for method, _, _ in hub.requests), "a dry run only reads"


@pytest.mark.slow
def test_pull_over_http_pins_revisions_resumes_and_works_offline(hub, api, tmp_path):
    push(load_collection(), ["lapvqa-diffvqa-coca"], tmp_path / "work", api=api, **QUIET)
    served = hub.repos["dmusingu/lapvqa-diffvqa-coca"]
    commit = hub.commit("dmusingu/lapvqa-diffvqa-coca")

    # The connection drops 12 MB into the weights; huggingface_hub keeps what it wrote (whole 10 MiB chunks)
    # and resumes from there with an HTTP Range request.
    weights = served["model.safetensors"]
    assert len(weights) > 12_000_000
    hub.fail_after_bytes["dmusingu/lapvqa-diffvqa-coca/model.safetensors"] = 12_000_000
    pulled = _cli(hub, "pull", "lapvqa-diffvqa-coca", "--revision", commit, cwd=tmp_path)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    resumed = [r for m, p, r in hub.requests if m == "GET" and p.endswith(f"{commit}/model.safetensors") and r]
    assert resumed and int(resumed[0][len("bytes=") : -1]) > 0
    snapshot = Path(pulled.stdout.strip().split(": ", 1)[1])
    assert snapshot.name == commit
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == served

    hub.server.shutdown()  # the Hub is gone: the cache still serves
    offline = _cli(hub, "pull", "lapvqa-diffvqa-coca", "--revision", commit, "--offline", cwd=tmp_path)
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert Path(offline.stdout.strip().split(": ", 1)[1]) == snapshot


def test_pull_upstream_files_into_a_folder(hub, upstream_repos, tmp_path):
    result = _cli(hub, "pull", "lapvqa-captioning", "lapvqa-vit-l14", "--upstream", "--local-dir", "raw", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model_best.pt", "encoder_final.pt"):
        path = tmp_path / "raw" / "lapvqa-pretrain-captioning" / name
        assert path.read_bytes() == upstream_repos["dmusingu/lapvqa-pretrain-captioning"][name]


def test_push_from_a_local_upstream_folder(hub, upstream_repos, api, tmp_path):
    raw = tmp_path / "raw" / "lapvqa-diffvqa"
    raw.mkdir(parents=True)
    (raw / "owlv2_best.pt").write_bytes(upstream_repos["dmusingu/lapvqa-diffvqa"]["owlv2_best.pt"])
    plan = push(
        load_collection(), ["lapvqa-diffvqa-owlv2"], tmp_path / "work", api=api, upstream_dir=tmp_path / "raw", **QUIET
    )
    assert not plan.failed
    config = json.loads(hub.repos["dmusingu/lapvqa-diffvqa-owlv2"]["config.json"])
    assert config["encoder_name"] == "owlv2" and config["conversion_info"]["source_file"] == "owlv2_best.pt"


@pytest.mark.slow
def test_convert_straight_from_a_hub_file_then_offline_from_the_cache(hub, tmp_path):
    arguments = ("convert", "diffvqa", "dmusingu/lapvqa-diffvqa/coca_best.pt", "--encoder", "coca", "--output")
    online = _cli(hub, *arguments, str(tmp_path / "online"), cwd=tmp_path)
    assert online.returncode == 0, online.stderr[-3000:]
    config = json.loads((tmp_path / "online" / "config.json").read_text())
    assert config["conversion_info"]["source_file"] == "coca_best.pt"

    hub.server.shutdown()  # the Hub is gone: offline, the cache still serves the file
    cached = _cli(hub, *arguments, str(tmp_path / "cached"), cwd=tmp_path, offline=True)
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert (tmp_path / "cached" / "model.safetensors").read_bytes() == (
        tmp_path / "online" / "model.safetensors"
    ).read_bytes()

    (tmp_path / "elsewhere").mkdir()  # a fresh Hugging Face home, offline: one line saying what was needed
    offline = _cli(hub, *arguments, str(tmp_path / "offline"), cwd=tmp_path / "elsewhere", offline=True)
    assert offline.returncode == 1 and len(offline.stderr.strip().splitlines()) == 1, offline.stderr
    assert offline.stderr.startswith(
        "error: dmusingu/lapvqa-diffvqa/coca_best.pt is no local file, and coca_best.pt of the Hub repo "
        "dmusingu/lapvqa-diffvqa could not be fetched"
    )


def test_pull_errors_are_one_line(tmp_path, capsys):
    from lapvqa_hf.cli import main as lapvqa

    assert lapvqa(["pull", "lapvqa-diffvqa-resnet"]) == 1
    assert capsys.readouterr().err.startswith("error: not in the collection manifest: ['lapvqa-diffvqa-resnet']")
    assert lapvqa(["pull", "lapvqa-diffvqa-coca", "--offline", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: dmusingu/lapvqa-diffvqa-coca is not in the local cache, and offline only the cache is read: run "
        "`lapvqa pull lapvqa-diffvqa-coca` once with the Hub reachable."
    ], "names the repo, and says what to run"


def test_a_failed_pull_into_a_folder_leaves_no_trace_there(tmp_path, capsys):
    from lapvqa_hf.cli import main as lapvqa

    assert lapvqa(["pull", "lapvqa-captioning", "--upstream", "--offline", "--local-dir", str(tmp_path / "raw")]) == 1
    assert "dmusingu/lapvqa-pretrain-captioning/model_best.pt is not in the local cache" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists(), "no lock file, no metadata folder, no empty folders"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    assert lapvqa(["pull", "lapvqa-captioning", "--upstream", "--offline", "--local-dir", str(tmp_path / "mine")]) == 1
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def _closed_port() -> str:
    import socket

    with socket.socket() as probe:  # bound and closed again: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_pull_without_a_reachable_hub_says_so_in_one_line(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": _closed_port(), "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-m", "lapvqa_hf.cli", "pull", "lapvqa-vit-l14", "--cache-dir",
                             str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: the Hugging Face Hub ({env['HF_ENDPOINT']}) could not be reached (")
    assert error.endswith("`lapvqa pull` downloads from it; --offline reads the local cache only.")
    assert "Traceback" not in result.stderr


def test_push_dry_run_without_a_reachable_hub_says_so_in_one_line(tmp_path, monkeypatch):
    import time

    from lapvqa_hf.hub import HubUnreachableError, reaching_the_hub

    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's retries back off
    api = HfApi(endpoint=_closed_port())
    with pytest.raises(HubUnreachableError) as raised:
        with reaching_the_hub("`lapvqa push` needs it"):
            plan_push(load_collection(), ["lapvqa-vit-l14"], tmp_path / "work", api=api, **QUIET)
    message = str(raised.value)
    assert "\n" not in message and message.endswith("`lapvqa push` needs it.") and "could not be reached" in message
