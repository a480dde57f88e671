"""Model-hub access that fails at once instead of retrying for a minute when there is no network."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import socket
import urllib.parse
import urllib.request
import warnings

from zsd.errors import ZsdError

PROBE_TIMEOUT_S = 1.5  # a missing download must fail within 2 s


def _hub_host() -> str:
    return urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname


def _offline_requested() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return True
    with contextlib.suppress(ImportError):  # read once at import: an earlier HF_HUB_OFFLINE=1 still counts
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return False


def probe_address(host: str) -> tuple[str, int]:
    """Where a download from `host` connects first: the HTTPS proxy, unless NO_PROXY exempts the host."""
    proxy = urllib.request.getproxies().get("https") or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        url = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return url.hostname, url.port or (443 if url.scheme == "https" else 80)
    return host, 443


@functools.lru_cache(maxsize=None)
def _reachable(address: tuple[str, int], timeout: float) -> bool:
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """False under HF_HUB_OFFLINE, else whether the hub (or the proxy that reaches it) accepts a connection."""
    return not _offline_requested() and _reachable(probe_address(_hub_host()), timeout)


class _DropRootErrors(logging.Filter):
    # open_clip reports a failed download with logging.error on the root logger before raising; zsd
    # turns the exception into its own one line, so the library's line would say the same thing twice.
    def filter(self, record):
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def offline_unless_reachable():
    """Within the block, huggingface_hub serves only its local cache when the hub is unreachable.

    huggingface_hub reads HF_HUB_OFFLINE once at import; its download functions consult
    `constants.HF_HUB_OFFLINE` at call time, so flipping that is what makes a cache miss fail
    immediately rather than after five back-off retries.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or not hub_reachable()
    quiet = _DropRootErrors()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)
        constants.HF_HUB_OFFLINE = saved


def load_local_or_hub(load, name: str, flag: str, what: str):
    """`load(name, local_files_only=...)` for transformers/diffusers: local files first, the hub only
    when it is reachable, so an offline machine fails at once with one line naming `flag`."""
    try:
        with warnings.catch_warnings():  # the libraries' deprecation chatter about their own internals
            warnings.simplefilter("ignore")
            return load(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the local cache (or not a model): try the hub if there is one
        pass
    reason = "not a local model and not in the Hugging Face cache"
    if not os.path.isdir(name) and hub_reachable():
        try:
            with offline_unless_reachable():
                return load(name, local_files_only=False)
        except Exception as e:  # noqa: BLE001 - every loading failure means the same to the user
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    elif not os.path.isdir(name):
        reason += ", and the hub is unreachable (offline or HF_HUB_OFFLINE)"
    raise ZsdError(f"Cannot load the {what} {name!r} ({reason}); pass {flag} a local model directory "
                   "or a Hugging Face id that downloads")


def require_extra(extra: str, *modules: str) -> None:
    """A command whose optional dependencies are missing names the extra that installs them."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ZsdError(f"this command needs {', '.join(missing)}: pip install 'zsd[{extra}]'")
