"""The requests of a push, through the real ``huggingface_hub`` client::

    check_can_push("me/qwen-vl-ties")                       # no request: id, offline mode, token
    url, commit, commit_url = upload_folder(staged, "me/qwen-vl-ties", message="…")

``surgeon.publish.push`` decides what is sent; this module only sends it. Every client error
leaves as a one-line ``HubError`` naming the next step (``surgeon.hub.errors``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from surgeon.errors import ConfigError, HubError
from surgeon.hub.errors import offline, translated
from surgeon.hub.repo_ids import is_repo_id

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
    return urlsplit(endpoint or endpoint_url()).hostname in _LOOPBACK


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


def render_card(metadata: dict, body: str) -> str:
    """README.md text: ``metadata`` as the YAML header (through huggingface_hub's ModelCardData,
    which drops None values and checks model-index), then the Markdown ``body``."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**metadata)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"))


def upload_folder(
    folder: Path, repo: str, *, message: str, token: str | None, private: bool = False, revision: str | None = None,
    endpoint: str | None = None,
) -> tuple[str, str, str]:
    """``create_repo(exist_ok=True)``, ``create_branch(exist_ok=True)`` for a new ``revision``, then
    one ``upload_folder`` of ``folder``. Returns (repo url, commit id, commit url). To a loopback
    endpoint (``endpoint`` or HF_ENDPOINT), uploads use plain LFS rather than Xet storage, and
    HF_HUB_OFFLINE does not apply."""
    from huggingface_hub import HfApi

    root = (endpoint or endpoint_url()).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    with _local_endpoint(_is_local(endpoint)), translated(repo, writing=True, endpoint=root):
        url = api.create_repo(repo, private=private or None, exist_ok=True)
        if revision and revision != "main" and not revision.startswith("refs/pr/"):
            api.create_branch(repo, branch=revision, exist_ok=True)
        from surgeon.hub.transfers import heartbeat

        with heartbeat(f"uploading to {repo}"):
            info = api.upload_folder(repo_id=repo, folder_path=folder, commit_message=message, revision=revision)
    return str(url), info.oid, info.commit_url


def endpoint_url() -> str:
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
