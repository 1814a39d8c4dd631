"""Where a model comes from: a local folder, or a Hub repo id fetched through the cache, opened as a
``surgeon.io.checkpoint.Checkpoint`` that reads one tensor at a time.

    with open_checkpoint("Qwen/Qwen2.5-VL-7B-Instruct@main") as ckpt:   # or "./my-vlm"
        w = ckpt.read("model.layers.0.mlp.up_proj.weight")
"""

from __future__ import annotations

from pathlib import Path

from surgeon.errors import CheckpointError
from surgeon.hub import download as hub
from surgeon.hub.repo_ids import PINNED, REPO_ID
from surgeon.io.checkpoint import Checkpoint

NOWHERE = Path("/nonexistent-surgeon-headers")  # the folder of a headers-only repo with no config or index


def open_checkpoint(source: str | Path, revision: str | None = None, headers_only: bool = False) -> Checkpoint:
    """Open a local folder, or resolve a Hub repo id (``org/name``, or ``org/name@revision`` to
    pin a branch, tag or commit) through the Hub cache.

    Repo ids download only config, safetensors and processor/tokenizer files, use the
    huggingface_hub cache, and honour ``HF_HOME`` and ``HF_HUB_OFFLINE``. ``headers_only``: for a
    repo id, fetch only the config and the safetensors headers (byte ranges; offline, the cached
    snapshot); the checkpoint then describes its tensors but cannot read them.
    """
    text = str(source)
    if not text.strip():
        raise CheckpointError("checkpoint", "the path is empty", "give a model folder or a Hub repo id (org/name)")
    path = Path(text).expanduser()
    pinned = PINNED.match(text)
    if pinned and not path.exists():
        if revision and revision != pinned.group(2):
            raise CheckpointError(text, f"names revision {pinned.group(2)} and --revision {revision}", "give one of them")
        text, revision = pinned.group(1), pinned.group(2)
        path = Path(text)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(text, "is a file, not a model folder", "pass the folder that holds config.json and the weights")
        if revision:
            raise CheckpointError(text, "is a local folder, so a revision cannot apply", "drop --revision for local folders")
        return Checkpoint(path, text)
    if REPO_ID.match(text) and not text.startswith("."):
        if headers_only and not hub.offline():
            small, commit, headers = hub.checkpoint_headers(text, revision)
            return Checkpoint(Path(small) if small else NOWHERE, text, revision, commit, headers=headers)
        folder, commit = hub.download_checkpoint(text, revision)
        return Checkpoint(Path(folder), text, revision, commit)
    raise CheckpointError(text, "no such folder", "check the path, or give a Hub repo id as org/name")


def open_config(source: str, revision: str | None = None) -> dict:
    """A model's config.json as a dict, from a local folder or a Hub repo id (only that file is
    fetched): what plans and dry runs are made from."""
    import json

    from surgeon.io.checkpoint import MAX_CONFIG_BYTES
    from surgeon.io.paths import special_kind

    path = Path(source).expanduser()
    if path.is_dir():
        if revision:
            raise CheckpointError(source, "is a local folder, so a revision cannot apply", "drop --revision for local folders")
        cfg = path / "config.json"
        if not cfg.is_file() or special_kind(cfg):
            raise CheckpointError(source, "has no config.json", "point at a model folder")
        if cfg.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(source, f"config.json is {cfg.stat().st_size / 1e6:.0f} MB, too large for a config", "restore the file")
    elif REPO_ID.match(source):
        cfg = Path(hub.download_config(source, revision)[0])
    else:
        raise CheckpointError(source, "no such folder", "check the path, or give a Hub repo id as org/name")
    try:
        data = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(source, f"config.json is not valid JSON ({e})", "restore the file from the original model") from None
    if not isinstance(data, dict):
        raise CheckpointError(source, "config.json is not a JSON object", "restore the file from the original model")
    return data
