"""User-facing errors.

A ZsdError carries one sentence that tells the user what is wrong and what to pass instead;
the CLI prints it without a traceback. Anything else that escapes is a bug and keeps its traceback.
"""

import os
import shutil
import tempfile
from pathlib import Path


class ZsdError(Exception):
    pass


def check_writable(folder, what: str) -> None:
    """Prove that `folder` (made if missing, and removed again) takes a new file, before any work is
    done; else a ZsdError naming the option `what`. A probe file, because permission bits do not
    tell (root, read-only mounts)."""
    folder = Path(folder)
    made = folder  # the outermost folder this check creates: removed again, so a later error leaves nothing
    while not made.parent.exists() and made.parent != made:
        made = made.parent
    made = None if made.exists() else made
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".zsd-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ZsdError(f"{what}: cannot write in {folder} ({e.strerror})") from None
    finally:
        if made is not None and made.is_dir():
            shutil.rmtree(made, ignore_errors=True)


def check_at_least(flag: str, value, minimum, *, exclusive: bool = False) -> None:
    """The library's twin of the CLI's click ranges, so a Python caller gets the same one-line error.

    Written as `not value >= minimum` so that NaN fails too. None means "use the default" and passes.
    """
    if value is None:
        return
    ok = value > minimum if exclusive else value >= minimum
    if not ok:
        raise ZsdError(f"{flag} {value}: must be {'>' if exclusive else '>='} {minimum}")
