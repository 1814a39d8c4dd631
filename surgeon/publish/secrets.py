"""What ``surgeon push`` never publishes: credential files, and text shaped like a key or token.

    credential_file("deploy/.env.production")     # -> "an environment file (.env*)", or None
    find_secret(b"key = AKIAIOSFODNN7EXAMPLE")     # -> "an AWS access key id (AKIA…)", or None
    mask("run-hf_abc….log")                        # -> "run-hf_….log": a name safe to print
    Scanner(secret=b"hf_…").feed(chunk)            # streamed, across chunk boundaries

A finding names the *kind* of secret and its pattern, never any character of the secret itself,
so that the refusal can be printed and logged safely. Bytes are searched as they are, with their
NUL bytes removed (UTF-16 and UTF-32 text of ASCII keys: ``h\\0f\\0_\\0…``), and with JSON and
Python escapes undone (``\\u0068\\u0066_…``, ``\\x68``, ``\\/``), so that an encoding does not hide
a key. Torch-free.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

# (what it is, the pattern a refusal names, the file-name globs), matched case-insensitively on
# every part of a file's path inside the folder; ``*.pub`` public keys are not secrets.
_FILES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("an environment file", (".env", ".env.*", ".envrc")),
    ("an SSH private key", ("id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "id_ecdsa_sk", "id_ed25519_sk")),
    ("a private key or certificate file", ("*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore")),
    ("a login file", (".netrc", "_netrc", ".git-credentials", ".htpasswd", ".pgpass")),
    ("a package-registry credential file", (".npmrc", ".pypirc", ".yarnrc.yml", ".gem/credentials")),
    ("a cloud credential file", ("credentials", "credentials.json", "application_default_credentials.json", "service-account*.json")),
    ("a Hugging Face token file", ("token", "stored_tokens")),
)

# (what it is, the pattern shown, the regex). Each starts with its literal, so that the search
# runs at the speed of a substring scan, and checks after the literal that it does not continue a
# longer word (``task-…`` is not ``sk-…``): a lookbehind placed first would make every position a
# candidate and the search a hundred times slower.
_KEYS: tuple[tuple[str, str, re.Pattern[bytes]], ...] = tuple(
    (what, shown, re.compile(pattern))
    for what, shown, pattern in (
        ("a Hub access token", "hf_…", rb"hf_(?<![A-Za-z0-9_]hf_)[A-Za-z0-9]{30,}|api_org_(?<![A-Za-z0-9_]api_org_)[A-Za-z0-9]{30,}"),
        ("an API key", "sk-…", rb"sk-(?<![A-Za-z0-9_-]sk-)(?:proj-|ant-[a-z0-9]{2,8}-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"),
        ("an AWS access key id", "AKIA…", rb"(?:AKIA|ASIA|ABIA|ACCA)(?<![A-Za-z0-9]....)[A-Z0-9]{16}(?![A-Za-z0-9])"),
        ("a GitHub token", "ghp_…", rb"gh[pousr]_(?<![A-Za-z0-9_]....)[A-Za-z0-9]{36,}|github_pat_(?<![A-Za-z0-9_]github_pat_)[A-Za-z0-9_]{40,}"),
        ("a private key", "-----BEGIN … PRIVATE KEY-----", rb"-----BEGIN(?: [A-Z0-9]+)* PRIVATE KEY(?: BLOCK)?-----"),
        ("a Slack token", "xox…-", rb"xox[abprs]-(?<![A-Za-z0-9]xox.-)[A-Za-z0-9-]{10,}"),
        ("a Google API key", "AIza…", rb"AIza(?<![A-Za-z0-9_-]AIza)[0-9A-Za-z_-]{35}"),
        ("a Stripe secret key", "sk_live_…", rb"[rs]k_live_(?<![A-Za-z0-9_].k_live_)[0-9A-Za-z]{20,}"),
    )
)
_ESCAPE = re.compile(rb"\\u00([0-7][0-9a-fA-F])|\\x([0-7][0-9a-fA-F])")
OVERLAP = 8192  # bytes kept between chunks, so that a key across a chunk boundary is still seen


def credential_file(rel: str) -> str | None:
    """What kind of credential file the path ``rel`` (inside the pushed folder) is, with the
    pattern it matches (``"an SSH private key (id_rsa)"``), or None."""
    parts = rel.lower().split("/")
    for what, globs in _FILES:
        for glob in globs:
            if "/" in glob:
                if fnmatch.fnmatch("/".join(parts[-2:]), glob):
                    return f"{what} ({glob})"
            elif fnmatch.fnmatch(parts[-1], glob):
                return f"{what} ({glob})"
    return None


def find_secret(data: bytes) -> str | None:
    """What kind of key or token ``data`` holds, with its pattern, or None; the bytes are also
    read with NUL bytes removed and with JSON/Python escapes undone."""
    for view in _views(data):
        for what, shown, pattern in _KEYS:
            if pattern.search(view):
                return f"{what} ({shown})"
    return None


def mask(text: str) -> str:
    """``text`` (a file name, to be printed) with every key in it replaced by its pattern."""
    data = text.encode()
    for _, shown, pattern in _KEYS:
        data = pattern.sub(shown.encode(), data)
    return data.decode(errors="replace")


def _views(data: bytes) -> list[bytes]:
    views = [data]
    if b"\0" in data:
        views.append(data.replace(b"\0", b""))
    for view in list(views):
        if b"\\u00" in view or b"\\x" in view:  # (``\/`` hides no key: keys hold no slash)
            views.append(unescape(view))
    return views


def unescape(data: bytes) -> bytes:
    """``data`` with ``\\u00XX``, ``\\xXX`` (ASCII) and ``\\/`` escapes replaced by their characters."""
    if b"\\/" in data:
        data = data.replace(b"\\/", b"/")
    if b"\\u00" in data or b"\\x" in data:
        data = _ESCAPE.sub(lambda m: bytes([int(m.group(1) or m.group(2), 16)]), data)
    return data


@dataclass
class Scanner:
    """Finds a key, or the exact ``secret`` (the token in use), in bytes fed chunk by chunk.
    ``shapes=False`` looks for ``secret`` alone (files the user allowed with ``--allow-file``)."""

    secret: bytes | None = None
    shapes: bool = True
    _tail: bytes = b""

    def feed(self, chunk: bytes) -> str | None:
        window = self._tail + chunk
        self._tail = window[-OVERLAP:]
        if self.secret and any(self.secret in view for view in _views(window)):
            return "the Hub access token in use"
        return find_secret(window) if self.shapes else None
