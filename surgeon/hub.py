"""The one module that talks to the Hugging Face Hub (through the real ``huggingface_hub`` client).

Everything else in surgeon calls these functions, so tests and users can point the whole tool at
another endpoint (``HF_ENDPOINT``) or the cache alone (``HF_HUB_OFFLINE=1``) in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from surgeon.errors import CheckpointError, HubError

# What a checkpoint needs: config, weights, tokenizer/processor/chat-template files. No pickles,
# no remote code.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn huggingface_hub exceptions into one-line HubErrors that name the next step."""
    from huggingface_hub import errors

    try:
        yield
    except errors.GatedRepoError:
        raise HubError(f"{what} is gated", "accept its terms on the Hub, then log in with `hf auth login`", 403) from None
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"{what} was not found on the Hub (or is private)",
            "check the name, or log in with `hf auth login` if it is private",
            404,
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{what}: revision not found", "check --revision (a branch, tag or commit)", 404) from None
    except errors.LocalEntryNotFoundError:
        if _offline():
            raise HubError(
                f"{what} is not a local folder and is not in the Hub cache (HF_HUB_OFFLINE is set)",
                "download it once while online, or pass a local folder",
            ) from None
        raise HubError(
            f"cannot reach the Hub to fetch {what}",
            "check the network connection, or set HF_HUB_OFFLINE=1 to use cached files only",
        ) from None
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        raise _http_error(what, status, str(e).splitlines()[0] if str(e) else "") from None


def _http_error(what: str, status: int | None, detail: str) -> HubError:
    hints = {
        401: ("the Hub refused the credentials", "log in with `hf auth login` or pass --token"),
        403: ("the Hub forbids this action", "check that your token has write access to the repo or org"),
        404: ("not found on the Hub", "check the repo name and revision"),
        429: ("the Hub is rate-limiting requests", "wait a few minutes and run the same command again"),
    }
    problem, hint = hints.get(status or 0, (f"the Hub answered HTTP {status}: {detail}", "try again later"))
    return HubError(f"{what}: {problem}", hint, status)


def download_checkpoint(repo_id: str, revision: str | None = None) -> tuple[str, str | None]:
    """Fetch (or find in the cache) the files a checkpoint needs. Returns (snapshot folder, commit)."""
    from huggingface_hub import snapshot_download

    with _translated(repo_id):
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS)
    path = Path(folder)
    if not any(path.glob("*.safetensors")) and not _offline():
        _refuse_pickle_only(repo_id, revision)
    commit = path.name if path.parent.name == "snapshots" else None
    return str(path), commit


def _refuse_pickle_only(repo_id: str, revision: str | None) -> None:
    from huggingface_hub import list_repo_files

    with _translated(repo_id):
        files = list_repo_files(repo_id, revision=revision)
    pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(
            repo_id,
            f"holds only pickle weights ({', '.join(pickles[:3])}); surgeon never unpickles files",
            "ask for a safetensors revision (many repos have refs/pr/N with one) or convert it yourself",
        )



def download_config(repo_id: str, revision: str | None = None) -> tuple[str, str | None]:
    """Fetch (or find in the cache) only ``config.json``. Returns (its path, commit)."""
    from huggingface_hub import hf_hub_download

    with _translated(repo_id):
        path = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    commit = path.parent.name if path.parent.parent.name == "snapshots" else None
    return str(path), commit
