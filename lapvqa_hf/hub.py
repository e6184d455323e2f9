"""Getting and publishing the LAPVQA collection: `lapvqa pull` and `lapvqa push`.

Everything that talks to the Hub goes through one `HfApi` (tests pass a recording stand-in); the token comes from
huggingface_hub's usual sources (`HF_TOKEN`, `hf auth login`) and is never printed.
"""

import contextlib
import difflib
import hashlib
import importlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from .collection import Collection, CollectionModel, ManifestError, load_collection
from .files import sha256_of
from .kinds import KINDS
from .messages import first_line
from .model_card import render_model_card
from .model_folders import hub_unreachable_reason

Log = Callable[[str], None]


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection errors of the HTTP client huggingface_hub uses (httpx2 from huggingface_hub 2, httpx before)."""
    errors = []
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


class HubUnreachableError(OSError):
    """The Hub could not be reached; the message says which endpoint and what needed it."""


@contextlib.contextmanager
def reaching_the_hub(needed_for: str) -> Iterator[None]:
    """Turns a failed connection (raised as such, or as huggingface_hub's 'cannot find it in the local cache')
    into one line naming the endpoint and what needed it."""
    try:
        yield
    except (*_transport_errors(), LocalEntryNotFoundError) as error:
        if isinstance(error, LocalEntryNotFoundError) and not str(error).startswith("Got: "):
            raise
        reason = first_line(error).removeprefix("Got: ")
        raise HubUnreachableError(
            f"the Hugging Face Hub ({constants.ENDPOINT}) could not be reached ({reason}); {needed_for}."
        ) from None


# --- pull -----------------------------------------------------------------------------------------------------


def pull(
    collection: Collection,
    names: list[str] | None = None,
    upstream: bool = False,
    revision: str | None = None,
    local_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    offline: bool = False,
    api: HfApi | None = None,
    log: Log = print,
) -> list[Path]:
    """Downloads converted repos (`snapshot_download`) or, with `upstream`, the raw `.pt` files they come from.

    Interrupted downloads resume; with `offline` (or `HF_HUB_OFFLINE=1`) only the local cache is used. A download
    that fails leaves no trace in `local_dir` (huggingface_hub's lock and metadata folder included).
    """
    api = api or HfApi()
    entries = collection.select(names, convertible_only=not upstream)
    if not entries:
        raise ManifestError("nothing to pull: no convertible entry was selected.")
    offline = offline or constants.HF_HUB_OFFLINE
    if not offline:
        unreachable = hub_unreachable_reason()
        if unreachable is not None:
            raise HubUnreachableError(
                f"the Hugging Face Hub ({constants.ENDPOINT}) could not be reached ({unreachable}); `lapvqa pull` "
                "downloads from it; --offline reads the local cache only."
            )
    paths = []
    for entry in entries:
        what = entry.source.repo_id + "/" + entry.source.filename if upstream else entry.repo_id
        target = None
        if local_dir is not None:
            target = Path(local_dir) / (entry.source.repo_id.split("/")[1] if upstream else entry.name)
        with _leaving_no_trace(target):
            try:
                if upstream:
                    path = api.hf_hub_download(
                        entry.source.repo_id,
                        entry.source.filename,
                        revision=revision or entry.source.revision,
                        cache_dir=cache_dir,
                        local_dir=target,
                        local_files_only=offline,
                    )
                else:
                    path = api.snapshot_download(
                        entry.repo_id,
                        revision=revision,
                        cache_dir=cache_dir,
                        local_dir=target,
                        local_files_only=offline,
                    )
            except LocalEntryNotFoundError:
                if not offline:
                    raise
                raise HubUnreachableError(
                    f"{what} is not in the local cache, and offline only the cache is read: run `lapvqa pull "
                    f"{entry.name}{' --upstream' if upstream else ''}` once with the Hub reachable."
                ) from None
        log(f"{what}: {path}")
        paths.append(Path(path))
    return paths


@contextlib.contextmanager
def _leaving_no_trace(target: Path | None) -> Iterator[None]:
    """If the block fails, removes what it created in `target`: the folder itself (and its parents) when they are
    new, else huggingface_hub's `.cache` folder there (lock files, download metadata) when that is new."""
    if target is None:
        yield
        return
    new = next((folder for folder in [*reversed(target.parents), target] if not folder.exists()), None)
    metadata = target / ".cache"
    metadata_is_new = not metadata.exists()
    try:
        yield
    except BaseException:
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)
        elif metadata_is_new:
            shutil.rmtree(metadata, ignore_errors=True)
        raise


# --- push -----------------------------------------------------------------------------------------------------


@dataclass
class FilePlan:
    path: str
    size: int
    sha256: str
    change: str  # "add", "update" or "same"


@dataclass
class RepoPlan:
    entry: CollectionModel
    folder: Path | None = None
    create_repo: bool = False
    files: list[FilePlan] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    card_diff: str = ""
    add_to_collection: bool = False
    error: str | None = None

    @property
    def needs_commit(self) -> bool:
        return any(f.change != "same" for f in self.files) or bool(self.deleted)


@dataclass
class PushPlan:
    collection_title: str
    collection_slug: str | None  # None: the collection does not exist yet and will be created
    repos: list[RepoPlan]

    @property
    def failed(self) -> list[RepoPlan]:
        return [r for r in self.repos if r.error is not None]


def git_blob_sha1(path: Path) -> str:
    """The id git (and the Hub) gives a regular, non-LFS file."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remote_files(api: HfApi, repo_id: str) -> dict[str, tuple[str, str | None]]:
    """`path -> (git blob id, LFS sha256 or None)` of the repo's main branch."""
    files = {}
    for item in api.list_repo_tree(repo_id, recursive=True):
        if hasattr(item, "blob_id"):
            lfs = getattr(item, "lfs", None)
            files[item.path] = (item.blob_id, getattr(lfs, "sha256", None) if lfs is not None else None)
    return files


def _remote_card(api: HfApi, repo_id: str) -> str:
    try:
        return Path(api.hf_hub_download(repo_id, "README.md")).read_text()
    except (EntryNotFoundError, RepositoryNotFoundError):
        return ""


def _find_collection_slug(api: HfApi, namespace: str, title: str) -> str | None:
    for collection in api.list_collections(owner=namespace, limit=100):
        if collection.title == title:
            return collection.slug
    return None


def prepare_repo(
    entry: CollectionModel,
    collection: Collection,
    work_dir: Path,
    api: HfApi,
    upstream_dir: Path | None,
    collection_items: set[str],
    log: Log,
) -> RepoPlan:
    """Fetches and converts (verify on) the upstream file, renders the card, and diffs the folder with the Hub."""
    plan = RepoPlan(entry)
    if upstream_dir is not None:
        source = upstream_dir / entry.source.repo_id.split("/")[1] / entry.source.filename
        if not source.is_file():
            plan.error = f"upstream file not found: {source}"
            return plan
    else:
        try:
            source = Path(
                api.hf_hub_download(entry.source.repo_id, entry.source.filename, revision=entry.source.revision)
            )
        except HfHubHTTPError as error:  # this repo fails; the others are still planned
            reason = first_line(error)
            plan.error = f"upstream file {entry.source.repo_id}/{entry.source.filename} could not be fetched ({reason})"
            return plan
    folder = work_dir / entry.name
    verify_lines: list[str] = []

    def record(line: str) -> None:
        verify_lines.append(line)
        log(f"  {line}")

    try:
        KINDS[entry.kind].converter_module().convert_entry(entry, source, folder, record)
    except (ValueError, OSError) as error:  # the converters' ConversionError is a ValueError
        plan.error = f"conversion failed, not pushed: {error}"
        return plan
    config = json.loads((folder / "config.json").read_text())
    verify_summary = next((line for line in verify_lines if line.startswith("verify ")), None)
    card = render_model_card(
        entry,
        collection,
        config.get("conversion_info"),
        verify_summary,
        config.get("training_results"),
        holds_encoder=config.get("encoder_config") is not None,
    )
    card.save(folder / "README.md")
    plan.folder = folder

    exists = api.repo_exists(entry.repo_id)
    plan.create_repo = not exists
    remote = _remote_files(api, entry.repo_id) if exists else {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        sha256 = sha256_of(path)
        if relative not in remote:
            change = "add"
        else:
            blob_id, lfs_sha256 = remote[relative]
            change = "same" if (lfs_sha256 == sha256 if lfs_sha256 else blob_id == git_blob_sha1(path)) else "update"
        plan.files.append(FilePlan(relative, path.stat().st_size, sha256, change))
    local_names = {f.path for f in plan.files}
    plan.deleted = sorted(p for p in remote if p not in local_names and p != ".gitattributes")
    old_card = _remote_card(api, entry.repo_id) if exists else ""
    new_card = (folder / "README.md").read_text()
    plan.card_diff = "".join(
        difflib.unified_diff(
            old_card.splitlines(keepends=True),
            new_card.splitlines(keepends=True),
            fromfile=f"{entry.repo_id}/README.md (Hub)",
            tofile=f"{entry.repo_id}/README.md (new)",
        )
    )
    plan.add_to_collection = entry.repo_id not in collection_items
    return plan


def plan_push(
    collection: Collection,
    names: list[str] | None,
    work_dir: str | Path,
    api: HfApi | None = None,
    upstream_dir: str | Path | None = None,
    log: Log = print,
) -> PushPlan:
    api = api or HfApi()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    slug = _find_collection_slug(api, collection.namespace, collection.title)
    items = {item.item_id for item in api.get_collection(slug).items} if slug else set()
    repos = []
    for entry in collection.select(names, convertible_only=True):
        log(f"{entry.repo_id}: converting {entry.source.repo_id}/{entry.source.filename}")
        repos.append(
            prepare_repo(entry, collection, work_dir, api, Path(upstream_dir) if upstream_dir else None, items, log)
        )
    return PushPlan(collection.title, slug, repos)


def describe(plan: PushPlan) -> str:
    """The whole plan, as `--dry-run` prints it."""
    lines = []
    target = plan.collection_slug or f"{plan.collection_title} (to be created)"
    for repo in plan.repos:
        entry = repo.entry
        if repo.error:
            lines.append(f"✗ {entry.repo_id}: {repo.error}")
            continue
        action = "create repo, " if repo.create_repo else ""
        commit = "one commit" if repo.needs_commit else "no commit (up to date)"
        lines.append(f"● {entry.repo_id}: {action}{commit}")
        for f in repo.files:
            lines.append(f"    {f.change:<6} {f.path:<40} {f.size:>12,d} B  sha256 {f.sha256}")
        for path in repo.deleted:
            lines.append(f"    delete {path}")
        if repo.card_diff:
            lines.append("    model card diff:")
            lines.extend("      " + line.rstrip("\n") for line in repo.card_diff.splitlines())
        else:
            lines.append("    model card unchanged")
        lines.append(f"    collection {target}: {'add' if repo.add_to_collection else 'already listed'}")
    pushed = [r for r in plan.repos if not r.error]
    lines.append(
        f"{len(pushed)} repo(s) ready, {sum(r.needs_commit for r in pushed)} commit(s), "
        f"{sum(r.add_to_collection for r in pushed)} collection addition(s), {len(plan.failed)} failed."
    )
    return "\n".join(lines)


def execute(plan: PushPlan, collection: Collection, api: HfApi | None = None, log: Log = print) -> None:
    """Applies a plan: repos whose conversion failed are skipped; each changed repo gets exactly one commit."""
    api = api or HfApi()
    slug = plan.collection_slug
    for repo in plan.repos:
        if repo.error:
            continue
        entry = repo.entry
        if repo.create_repo:
            api.create_repo(entry.repo_id, exist_ok=True)
        if repo.needs_commit:
            # upload_folder makes a single commit; if it fails, the previous revision stays as it was.
            api.upload_folder(
                repo_id=entry.repo_id,
                folder_path=repo.folder,
                commit_message=f"Convert {entry.source.repo_id}/{entry.source.filename} with lapvqa-hf",
                delete_patterns=repo.deleted or None,
            )
            log(f"{entry.repo_id}: committed {sum(f.change != 'same' for f in repo.files)} file(s)")
        else:
            log(f"{entry.repo_id}: up to date, no commit")
        if repo.add_to_collection:
            if slug is None:
                slug = api.create_collection(collection.title, namespace=collection.namespace, exists_ok=True).slug
            api.add_collection_item(slug, entry.repo_id, "model", exists_ok=True)
            log(f"{entry.repo_id}: added to collection {slug}")


def push(
    collection: Collection,
    names: list[str] | None,
    work_dir: str | Path,
    dry_run: bool = False,
    api: HfApi | None = None,
    upstream_dir: str | Path | None = None,
    log: Log = print,
) -> PushPlan:
    api = api or HfApi()
    plan = plan_push(collection, names, work_dir, api=api, upstream_dir=upstream_dir, log=log)
    log(describe(plan))
    if not dry_run:
        execute(plan, collection, api=api, log=log)
    return plan


__all__ = ["PushPlan", "describe", "execute", "load_collection", "plan_push", "pull", "push"]
