"""Reading checkpoints from the Hugging Face Hub, through the real ``huggingface_hub`` client.

``download_checkpoint(repo_id, revision)`` fetches (or finds in the cache) what a checkpoint needs,
never a pickle; ``checkpoint_headers`` fetches only its config and the safetensors headers (HTTP
byte ranges, as ``huggingface_hub.get_safetensors_metadata`` does), for what needs no weights; ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE=1`` point every read at another endpoint or at
the cache alone. Failures leave as one-line ``HubError``s (``surgeon.hub.errors``).
"""

from __future__ import annotations

import struct
from pathlib import Path

from surgeon.errors import CheckpointError
from surgeon.io.header import MAX_HEADER
from surgeon.hub.errors import offline, translated
from surgeon.hub.transfers import cache_bytes, heartbeat

# What a checkpoint needs: config, weights, tokenizer/processor/chat-template files, and the
# modeling/processing code of remote-code models (never run by surgeon: copied into outputs so
# that they load with trust_remote_code as their inputs do). No pickles.
CHECKPOINT_PATTERNS = ["README.md", "*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]


def _named(repo_id: str, revision: str | None) -> str:
    return f"{repo_id} at revision {revision}" if revision else repo_id


def download_checkpoint(repo_id: str, revision: str | None = None) -> tuple[str, str | None]:
    """Fetch (or find in the cache) the files a checkpoint needs. Returns (snapshot folder, commit)."""
    from huggingface_hub import snapshot_download

    with translated(_named(repo_id, revision)), heartbeat(f"downloading {repo_id}", cache_bytes(repo_id)):
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
    with translated(_named(repo_id, revision)), heartbeat(f"downloading {repo_id}", cache_bytes(repo_id)):
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


HEAD_BYTES = 100_000  # the first request of a header: most safetensors headers are shorter


def checkpoint_headers(repo_id: str, revision: str | None = None) -> tuple[str | None, str, dict[str, tuple[bytes, int | None]]]:
    """The config/index folder, the commit, and ``{file: (header bytes, file size)}`` of every
    safetensors file of a repo, fetched with byte-range requests: no weights are downloaded.
    Returns (the snapshot folder holding config.json and the index, or None when the repo has
    neither; the commit; the headers)."""
    from huggingface_hub import HfApi, hf_hub_download

    name = _named(repo_id, revision)
    with translated(name):
        info = HfApi().model_info(repo_id, revision=revision)
    commit = str(info.sha)
    present = {s.rfilename for s in info.siblings or []}
    folder = None
    for small in ("config.json", "model.safetensors.index.json"):
        if small in present:
            with translated(name):
                folder = str(Path(hf_hub_download(repo_id, small, revision=commit)).parent)
    files = sorted(f for f in present if f.endswith(".safetensors") and "/" not in f)
    if not files:
        _refuse_pickle_only(repo_id, commit)
        raise CheckpointError(repo_id, "has no safetensors weights (no *.safetensors files)", "check the repo id and revision")
    return folder, commit, {f: _remote_header(repo_id, f, commit, name) for f in files}


def _remote_header(repo_id: str, filename: str, commit: str, name: str) -> tuple[bytes, int | None]:
    """(header bytes without the length prefix, file size or None if the server did not say) of
    one safetensors file on the Hub."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, filename, revision=commit)

    def get(first: int, last: int) -> tuple[bytes, int | None]:
        """Bytes ``first..last``; from a server that ignores ranges and sends the whole file, only
        as many bytes as that takes are read before the connection is closed."""
        with translated(f"{name}: {filename}"):
            with get_session().stream("GET", url, headers={**build_hf_headers(), "range": f"bytes={first}-{last}"}, timeout=30) as response:
                if response.status_code >= 400:
                    response.read()  # the error's body, for the message
                hf_raise_for_status(response)
                if response.status_code == 206:
                    total = response.headers.get("content-range", "").rpartition("/")[2]
                    return response.read(), int(total) if total.isdigit() else None
                length = response.headers.get("content-length", "")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > last:
                        break
                return bytes(body[first : last + 1]), int(length) if length.isdigit() else None

    head, size = get(0, HEAD_BYTES - 1)
    if len(head) < 8:
        raise CheckpointError(repo_id, f"{filename} is {size} bytes long, too short to be a safetensors file", "check the repo's files")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER or (size is not None and n > size - 8):
        raise CheckpointError(repo_id, f"{filename} has a corrupt header (declared length {n})", "check the repo's files")
    raw = head[8 : 8 + n] if len(head) >= 8 + n else get(8, 8 + n - 1)[0]
    return raw, size


def dataset_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit a Hub dataset's ``revision`` (default branch: None) points at, or None when offline
    or the Hub cannot say."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return HfApi().dataset_info(repo_id, revision=revision).sha
    except Exception:  # noqa: BLE001 - unknown is recorded as unknown, not as an error of the run
        return None


TRAINING_CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jsonl"]  # surgeon train's checkpoints: no pickles


def download_training_checkpoint(spec: str) -> Path:
    """The local snapshot of a ``surgeon train`` checkpoint pushed to the Hub: ``org/name`` or
    ``org/name@revision``, the checkpoint's files at the repo's top level."""
    from huggingface_hub import snapshot_download

    from surgeon.hub.repo_ids import PINNED

    pinned = PINNED.match(spec)
    repo_id, revision = (pinned.group(1), pinned.group(2)) if pinned else (spec, None)
    with translated(_named(repo_id, revision)), heartbeat(f"downloading {repo_id}", cache_bytes(repo_id)):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=TRAINING_CHECKPOINT_PATTERNS))
