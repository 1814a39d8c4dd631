"""Reading checkpoints from the Hugging Face Hub, through the real ``huggingface_hub`` client.

``download_checkpoint(repo_id, revision)`` fetches (or finds in the cache) what a checkpoint needs,
never a pickle; ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE=1`` point every read at another endpoint or at
the cache alone. Failures leave as one-line ``HubError``s (``surgeon.io.hub_errors``).
"""

from __future__ import annotations

from pathlib import Path

from surgeon.errors import CheckpointError
from surgeon.io.hub_errors import offline, translated

# What a checkpoint needs: config, weights, tokenizer/processor/chat-template files, and the
# modeling/processing code of remote-code models (never run by surgeon: copied into outputs so
# that they load with trust_remote_code as their inputs do). No pickles.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]


def _named(repo_id: str, revision: str | None) -> str:
    return f"{repo_id} at revision {revision}" if revision else repo_id


def download_checkpoint(repo_id: str, revision: str | None = None) -> tuple[str, str | None]:
    """Fetch (or find in the cache) the files a checkpoint needs. Returns (snapshot folder, commit)."""
    from huggingface_hub import snapshot_download

    with translated(_named(repo_id, revision)):
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS)
    path = Path(folder)
    if not any(path.glob("*.safetensors")) and not offline():
        _refuse_pickle_only(repo_id, revision)
    commit = path.name if path.parent.name == "snapshots" else None
    return str(path), commit


def download_config(repo_id: str, revision: str | None = None) -> tuple[str, str | None]:
    """Fetch (or find in the cache) only ``config.json``. Returns (its path, commit)."""
    from huggingface_hub import hf_hub_download

    with translated(_named(repo_id, revision)):
        path = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    commit = path.parent.name if path.parent.parent.name == "snapshots" else None
    return str(path), commit


def download_file(repo_id: str, filename: str, revision: str | None = None) -> str:
    """Fetch (or find in the cache) one file of a repo. Returns its local path."""
    from huggingface_hub import hf_hub_download

    with translated(_named(repo_id, revision)):
        return str(hf_hub_download(repo_id, filename, revision=revision))


def adapter_snapshot(repo_id: str, revision: str | None = None) -> str | None:
    """The local snapshot of a peft adapter repo (config, adapter and surgeon-module weights,
    processor files), or None when the repo holds no ``adapter_config.json`` or cannot be reached."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        hf_hub_download(repo_id, "adapter_config.json", revision=revision)
    except Exception:  # noqa: BLE001 - not an adapter repo, or not reachable: the model loader reports it
        return None
    with translated(_named(repo_id, revision)):
        return snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS)


def _refuse_pickle_only(repo_id: str, revision: str | None) -> None:
    from huggingface_hub import list_repo_files

    with translated(repo_id):
        files = list_repo_files(repo_id, revision=revision)
    pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(
            repo_id,
            f"holds only pickle weights ({', '.join(pickles[:3])}); surgeon never unpickles files",
            "ask for a safetensors revision (many repos have refs/pr/N with one) or convert it yourself",
        )
