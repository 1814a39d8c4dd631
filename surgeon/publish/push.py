"""``surgeon push``: publish an output folder with a model card built from its ``surgeon.json``::

    result = push_folder("merged/", PushConfig(repo="me/qwen-vl-ties", private=True))
    result.commit_url, result.files, result.card

What is sent is planned and checked whole first (``surgeon.publish.upload``); the requests go
through ``surgeon.hub.client``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from surgeon.errors import CheckpointError
from surgeon.hub import client as hub
from surgeon.io.provenance import read_record
from surgeon.publish.card import base_repo_ids, build_card, is_template_card
from surgeon.publish.secrets import mask
from surgeon.publish.upload import CARD, plan_upload, staged


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


def push_folder(folder: str | Path, config: PushConfig, *, endpoint: str | None = None) -> PushResult:
    """Publish ``folder`` to ``config.repo`` with a model card built from its ``surgeon.json``.

    ``create_repo(exist_ok=True)``, ``create_branch(exist_ok=True)`` for a new ``revision``, then
    one ``upload_folder`` of a staged copy (see ``surgeon.publish.upload``): the folder itself is never
    written, so a failed push leaves it as it was and the same call can simply be repeated
    (unchanged files are skipped by the Hub). ``endpoint``: another Hub API root, such as the
    local stand-in (``surgeon.demo.hub_standin``). To a loopback endpoint (``endpoint`` or HF_ENDPOINT),
    uploads use plain LFS rather than Xet storage, and HF_HUB_OFFLINE does not apply.

    Raises CheckpointError (not a folder, a token or local path in a file), ConfigError (bad repo
    id), HubError (offline, not logged in, 401/403/404/429, unreachable) — all one line.
    """
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(str(folder), "no such folder", "give the output folder of a surgeon command")
    if not any(path.iterdir()):
        raise CheckpointError(str(folder), "is empty, so there is nothing to push")
    if not config.dry_run:
        hub.check_can_push(config.repo, config.token, endpoint)
    else:
        hub.check_repo_id(config.repo)
    record = read_record(path)
    card, card_source, sent_card, notes = _card(path, record, config)
    bases = base_repo_ids(record) if record else []
    base = bases[0] if bases else None
    token = config.token or hub.stored_token()
    plan = plan_upload(path, card, record, token, base, allow=tuple(config.allow_file))
    revision = config.revision or "main"
    root = (endpoint or hub.endpoint_url()).rstrip("/")

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

    artifact = (record or {}).get("artifact", "folder")
    message = config.message or (f"Upload {artifact} made by surgeon {record['command']}" if record else "Upload folder with surgeon push")
    with staged(path, plan) as tmp:
        url, commit, commit_url = hub.upload_folder(
            tmp, config.repo, message=message, token=token, private=config.private, revision=config.revision, endpoint=endpoint
        )
    return dataclasses.replace(result, url=url, commit=commit, commit_url=commit_url)


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
