"""Model-hub access that fails at once instead of retrying for a minute when there is no network."""

from __future__ import annotations

import contextlib
import functools
import os
import socket


@functools.lru_cache(maxsize=None)
def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


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
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
