"""Hub errors in one line: every ``huggingface_hub`` and HTTP-client exception that reading from or
pushing to the Hub can raise becomes a ``HubError`` that names what failed and the next step.

``with translated("acme/model"): hf_hub_download(...)``; ``writing=True`` when pushing, so the
hints speak of credentials and write access.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from surgeon.errors import HubError, SurgeonError


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextmanager
def translated(what: str, *, writing: bool = False, endpoint: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub and HTTP-client exceptions into one-line HubErrors that name the next step.

    ``writing``: the hints speak of pushing (credentials, write access) rather than downloading.
    Exceptions are recognised anywhere in their cause chain (the client wraps LFS upload errors).
    """
    try:
        yield
    except SurgeonError:
        raise
    except Exception as exc:  # noqa: BLE001 — translated below or re-raised unchanged
        translated = _translate(exc, what, writing, endpoint)
        if translated is None:
            raise
        raise translated from None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# HTTP-client exceptions (httpx2 / httpx / requests / urllib3) meaning the server was not reached.
_NETWORK_NAMES = {
    "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
    "NetworkError", "ReadError", "WriteError", "RemoteProtocolError", "ProxyError", "SSLError",
    "ConnectionError", "Timeout", "NewConnectionError", "MaxRetryError",
}


def _network_failure(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return any(
        c.__name__ in _NETWORK_NAMES and c.__module__.split(".")[0] in ("httpx2", "httpx", "httpcore", "httpcore2", "requests", "urllib3")
        for c in type(exc).__mro__
    )


def _translate(exc: BaseException, what: str, writing: bool, endpoint: str | None) -> HubError | None:
    from huggingface_hub import constants, errors

    for e in _chain(exc):
        if isinstance(e, errors.OfflineModeIsEnabled):
            return HubError(f"{what}: HF_HUB_OFFLINE is set, so the Hub cannot be reached", "unset HF_HUB_OFFLINE and run the command again")
        if isinstance(e, errors.GatedRepoError):
            return HubError(f"{what} is gated", "accept its terms on the Hub, then log in with `hf auth login`", 403)
        if isinstance(e, errors.RepositoryNotFoundError):
            status = _status(e)
            if writing:
                return _http_error(what, 401 if status == 401 else 404, "", writing)
            return HubError(
                f"{what} was not found on the Hub (or is private)",
                "check the name, or log in with `hf auth login` if it is private",
                404,
            )
        if isinstance(e, errors.RevisionNotFoundError):
            return HubError(f"{what}: revision not found", "check --revision (a branch, tag or commit)", 404)
        if isinstance(e, errors.LocalEntryNotFoundError):
            if offline():
                return HubError(
                    f"{what} is not a local folder and is not in the Hub cache (HF_HUB_OFFLINE is set)",
                    "download it once while online, or pass a local folder",
                )
            answered = next((c for c in _chain(e) if isinstance(c, errors.HfHubHTTPError) and _status(c)), None)
            if answered is not None:  # the server answered: say what it said, not that it is unreachable
                return _http_error(what, _status(answered), _first_line(answered), writing)
            return HubError(
                f"cannot reach the Hub to fetch {what}",
                "check the network connection, or set HF_HUB_OFFLINE=1 to use cached files only",
            )
        if isinstance(e, errors.HfHubHTTPError):
            return _http_error(what, _status(e), str(e).strip().splitlines()[0] if str(e).strip() else "", writing)
        if isinstance(e, ValueError) and str(e).startswith("Invalid metadata in README.md"):
            detail = " ".join(str(e).split("\n")[1:2]).strip("- ") or "invalid YAML header"
            return HubError(
                f"{what}: the Hub rejected the metadata of README.md ({detail})",
                "fix the YAML header of README.md, or pass --overwrite-card to send the card built from surgeon.json",
                400,
            )
        if _network_failure(e):
            where = endpoint or constants.ENDPOINT
            timeout = "Timeout" in type(e).__name__ or isinstance(e, TimeoutError)
            problem = f"the Hub at {where} did not answer in time" if timeout else f"cannot reach the Hub at {where}"
            reason = " ".join(str(e).split())[:80]
            return HubError(
                f"{what}: {problem}" + (f" ({reason})" if reason and not timeout else ""),
                "check the network connection (and HF_ENDPOINT if set), then run the same command again",
            )
    return None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _http_error(what: str, status: int | None, detail: str, writing: bool = False) -> HubError:
    hints = {
        401: ("the Hub refused the credentials", "log in with `hf auth login` or pass --token"),
        403: ("the Hub forbids this action", "check that your token has write access to the repo or org"),
        404: ("not found on the Hub", "check the repo name and revision"),
        429: ("the Hub is rate-limiting requests", "wait a few minutes and run the same command again"),
    }
    if writing:
        hints |= {
            401: (
                "the Hub refused the credentials (not logged in, or the token is invalid or expired)",
                "log in with `hf auth login`, set HF_TOKEN, or pass --token; then run the same command again",
            ),
            403: (
                "your token may not write to this repo",
                "use a token with write access to its namespace (`hf auth login`), or push to your own namespace",
            ),
            404: (
                "the Hub has no such repo, or your token cannot see it",
                "check --repo, and that your token may create repos in its namespace; then run the same command again",
            ),
        }
    problem, hint = hints.get(status or 0, (f"the Hub answered HTTP {status}: {detail}", "try again later"))
    return HubError(f"{what}: {problem}", hint, status)
