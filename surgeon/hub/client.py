"""Publishing to the Hugging Face Hub (through the real ``huggingface_hub`` client)::

    result = push_folder("merged/", PushConfig(repo="me/qwen-vl-ties", private=True))
    result.commit_url, result.files, result.card

Reading from the Hub is ``surgeon.io.download``. Every client error leaves as a one-line
``HubError`` naming the next step (``surgeon.io.hub_errors``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from surgeon.errors import CheckpointError, ConfigError, HubError
from surgeon.io.hub_errors import offline, translated
from surgeon.io.repo_ids import is_repo_id

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class PushConfig:
    """What ``surgeon push`` does: the target repo and how to commit there."""

    repo: str  # ORG/NAME on the Hub; created (exist_ok) when missing
    private: bool = False  # create the repo private (a repo that exists keeps its visibility)
    revision: str | None = None  # branch to commit to (created from main when missing); None: main
    message: str | None = None  # commit message; None: one naming the surgeon command that made the folder
    token: str | None = field(default=None, repr=False)  # None: HF_TOKEN, then the stored `hf auth login` token
    dry_run: bool = False  # plan, check and build the card; send nothing
    overwrite_card: bool = False  # replace a README.md in the folder by the card built from surgeon.json
    allow_file: tuple[str, ...] = ()  # globs of files to send although they look like credentials (never the token in use)


@dataclass(frozen=True)
class PushResult:
    """What was sent (or, for a dry run, would be sent) and where it landed."""

    repo: str
    revision: str
    url: str  # the repo's page (a dry run: where it would be)
    commit: str | None  # the commit id; None for a dry run
    commit_url: str | None
    files: tuple[tuple[str, int], ...]  # (path in repo, bytes), sorted
    card: str | None  # the README.md sent
    card_source: str  # "surgeon.json" (built), "kept" (the folder's own README.md), "none"
    notes: tuple[str, ...]  # changes made to the uploaded copies (dropped local paths)
    dry_run: bool
    refused: tuple[tuple[str, str], ...] = ()  # (path, problem): what stops the push (a dry run lists them)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["files"] = [{"path": p, "bytes": n} for p, n in self.files]
        return d


def stored_token() -> str | None:
    """The token the client would use: HF_TOKEN, else the one stored by `hf auth login`, else None."""
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # noqa: BLE001 — e.g. a failed OIDC exchange: treated as not logged in
        return None


def check_repo_id(repo: str) -> None:
    if not is_repo_id(repo):
        raise ConfigError("repo", f"{repo!r} is not a Hub repo id", "write it as ORG/NAME, e.g. my-user/qwen-vl-drift")


def _is_local(endpoint: str | None) -> bool:
    """Whether pushes go to loopback (the stand-in), through ``endpoint`` or HF_ENDPOINT."""
    return urlsplit(endpoint or _endpoint()).hostname in _LOOPBACK


def check_can_push(repo: str, token: str | None = None, endpoint: str | None = None) -> None:
    """Fail early, without any request, when a push could not work (bad id, offline, no token).

    HF_HUB_OFFLINE does not stop a push to a loopback endpoint (the stand-in)."""
    check_repo_id(repo)
    if offline() and not _is_local(endpoint):
        raise HubError(
            "HF_HUB_OFFLINE is set, so nothing can be uploaded", "unset HF_HUB_OFFLINE to push, or use --dry-run to see what would be sent"
        )
    if not (token or stored_token()):
        raise HubError(
            "not logged in to the Hugging Face Hub",
            "run `hf auth login`, set HF_TOKEN, or pass --token (a token with write access)",
            401,
        )


def model_card_text(metadata: dict, body: str) -> str:
    """README.md text: ``metadata`` as the YAML header (through huggingface_hub's ModelCardData,
    which drops None values and checks model-index), then the Markdown ``body``."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**metadata)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"))


def push_folder(folder: str | Path, config: PushConfig, *, endpoint: str | None = None) -> PushResult:
    """Publish ``folder`` to ``config.repo`` with a model card built from its ``surgeon.json``.

    ``create_repo(exist_ok=True)``, ``create_branch(exist_ok=True)`` for a new ``revision``, then
    one ``upload_folder`` of a staged copy (see ``surgeon.hub.upload``): the folder itself is never
    written, so a failed push leaves it as it was and the same call can simply be repeated
    (unchanged files are skipped by the Hub). ``endpoint``: another Hub API root, such as the
    local stand-in (``surgeon.demo.hub_standin``). To a loopback endpoint (``endpoint`` or HF_ENDPOINT),
    uploads use plain LFS rather than Xet storage, and HF_HUB_OFFLINE does not apply.

    Raises CheckpointError (not a folder, a token or local path in a file), ConfigError (bad repo
    id), HubError (offline, not logged in, 401/403/404/429, unreachable) — all one line.
    """
    from surgeon.hub.card import base_repo_ids
    from surgeon.hub.upload import plan_upload, staged
    from surgeon.io.provenance import read_record

    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(str(folder), "no such folder", "give the output folder of a surgeon command")
    if not any(path.iterdir()):
        raise CheckpointError(str(folder), "is empty, so there is nothing to push")
    if not config.dry_run:
        check_can_push(config.repo, config.token, endpoint)
    else:
        check_repo_id(config.repo)
    record = read_record(path)
    card, card_source, sent_card, notes = _card(path, record, config)
    bases = base_repo_ids(record) if record else []
    typed = (((record or {}).get("inputs") or {}).get("model") or {}).get("source")  # a local base, as the user typed it
    base = bases[0] if bases else typed if isinstance(typed, str) and typed else None
    token = config.token or stored_token()
    plan = plan_upload(path, card, record, token, base, allow=tuple(config.allow_file))
    revision = config.revision or "main"
    root = (endpoint or _endpoint()).rstrip("/")
    from surgeon.hub.secrets import mask

    shown_files = tuple((mask(rel), size) for rel, size in plan.files)  # what is printed never holds a key
    shown_refused = tuple((mask(rel), problem) for rel, problem in plan.refused)
    result = PushResult(
        config.repo, revision, f"{root}/{config.repo}", None, None, shown_files, sent_card, card_source, notes + plan.notes,
        config.dry_run, shown_refused,
    )  # fmt: skip
    if config.dry_run:
        return result
    if plan.refused:
        raise refusal_error(shown_refused)

    from huggingface_hub import HfApi

    artifact = (record or {}).get("artifact", "folder")
    message = config.message or (f"Upload {artifact} made by surgeon {record['command']}" if record else "Upload folder with surgeon push")
    api = HfApi(endpoint=endpoint, token=token)
    with _local_endpoint(_is_local(endpoint)), staged(path, plan) as tmp, translated(config.repo, writing=True, endpoint=root):
        url = api.create_repo(config.repo, private=config.private or None, exist_ok=True)
        if config.revision and config.revision != "main" and not config.revision.startswith("refs/pr/"):
            api.create_branch(config.repo, branch=config.revision, exist_ok=True)
        info = api.upload_folder(repo_id=config.repo, folder_path=tmp, commit_message=message, revision=config.revision)
    return dataclasses.replace(result, url=str(url), commit=info.oid, commit_url=info.commit_url)


def refusal_error(refused: tuple[tuple[str, str], ...]) -> CheckpointError:
    """The one-line error for files that must not be published (the first, and how many more)."""
    (first, problem), more = refused[0], len(refused) - 1
    hint = "remove it (or replace it with a Hub repo id) and push again; surgeon push never uploads credentials or local paths"
    if ("credential" in problem or "looks like" in problem) and "token in use" not in problem:
        hint = "remove it and push again, or pass --allow-file PATTERN if it is no secret; surgeon push never uploads credentials"
    if more:
        hint = f"{more} more file{'s' if more > 1 else ''} would be refused (surgeon push --dry-run lists them); " + hint
    return CheckpointError(first, problem, hint)


def _card(folder: Path, record: dict | None, config: PushConfig) -> tuple[str | None, str, str | None, tuple[str, ...]]:
    """(card to send instead of the folder's README.md or None, its source, the README sent, notes).

    The folder's README.md is kept unless --overwrite-card, or unless it is the blank template a
    library (peft, the transformers Trainer) wrote and surgeon.json can replace it.
    """
    from surgeon.hub.card import build_card, is_template_card
    from surgeon.hub.upload import CARD

    readme = (folder / CARD).read_text(errors="replace") if (folder / CARD).is_file() else None
    if record is None:
        if config.overwrite_card:
            raise CheckpointError(
                str(folder), "has no surgeon.json, so surgeon cannot build a model card", "drop --overwrite-card to send the folder's README.md"
            )
        return None, "kept" if readme is not None else "none", readme, ()
    template = readme is not None and is_template_card(readme)
    if readme is not None and not config.overwrite_card and not template:
        return None, "kept", readme, ()
    card = build_card(folder, config.repo, record)
    note = f"{CARD}: the blank model-card template a library wrote was replaced by the card built from surgeon.json"
    return card, "surgeon.json", card, (note,) if template and not config.overwrite_card else ()


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextmanager
def _local_endpoint(enabled: bool) -> Iterator[None]:
    """For a local endpoint, for the duration: no Xet uploads (the stand-in serves no Xet storage)
    and no offline mode (loopback is not the network HF_HUB_OFFLINE keeps away from)."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_DISABLE_XET, constants.HF_HUB_OFFLINE
    constants.HF_HUB_DISABLE_XET, constants.HF_HUB_OFFLINE = True, False
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET, constants.HF_HUB_OFFLINE = before
