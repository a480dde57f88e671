"""User-facing errors.

A ZsdError carries one sentence that tells the user what is wrong and what to pass instead;
the CLI prints it without a traceback. Anything else that escapes is a bug and keeps its traceback.
"""

import errno
import os
import shutil
import tempfile
from pathlib import Path


class ZsdError(Exception):
    pass


def first_missing(folder) -> Path | None:
    """The outermost folder of `folder`'s path that does not exist yet (None if it exists): what to remove
    so that a failed command leaves no folder it made."""
    missing = None
    for p in [Path(folder).absolute(), *Path(folder).absolute().parents]:
        if p.exists():
            return missing
        missing = p
    return missing


def check_writable(folder, what: str) -> None:
    """Prove that `folder` (made if missing, and removed again) takes a new file, before any work is
    done; else a ZsdError naming the option `what`. A probe file, because permission bits do not
    tell (root, read-only mounts)."""
    folder = Path(folder)
    made = first_missing(folder)  # removed again, so a later error leaves nothing
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


# A zsd run folder's own files (zsd.student and zsd.train name them): no command writes over one.
RUN_FILES = frozenset({"student.safetensors", "student.json", "ema_student.safetensors", "ema_student.json",
                       "train_state.pt", "log.jsonl", "text_embeddings.pt", "zsd.lock"})


def check_outputs(outputs, inputs=(), flag: str = "--out") -> None:
    """Refuse, in one line and before any work, to write an output over one of the command's own
    `inputs` (files, or folders such as stores that it reads) or over a file of a zsd run folder."""
    ins = [Path(p) for p in inputs if p is not None and Path(p).exists()]
    for out in map(Path, outputs):
        folder = out.resolve().parent
        if out.name in RUN_FILES and ((folder / "student.json").is_file() or (folder / "train_state.pt").is_file()):
            raise ZsdError(f"{flag}: writing {out} would overwrite {out.name} of the run in {folder}: "
                           "choose another path")
        for given in ins:
            if out.resolve() == given.resolve() or (out.exists() and os.path.samefile(out, given)):  # links too
                raise ZsdError(f"{flag}: writing {out} would overwrite {given}, an input of this command: "
                               "choose another path")


def temp_path(path) -> Path:
    """A temporary name beside `path`, unique to this process. Short where `path`'s own name is
    long: a legal name plus a suffix may pass the file system's 255 bytes."""
    path = Path(path)
    name = f".{path.name}.{os.getpid()}.tmp"
    if len(os.fsencode(name)) > 255:
        name = f".zsd-{os.getpid()}-{abs(hash(path.name)):x}.tmp"
    return path.with_name(name)


def write_atomic(path, content: bytes | str, flag: str = "--out") -> None:
    """`path` whole or not at all: written to `temp_path` and renamed. The temporary file is
    removed on any failure or interrupt; a failed write is a ZsdError naming `flag`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        else:
            tmp.write_bytes(content)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ZsdError(f"{flag}: cannot write {path} ({e.strerror or e}); nothing was written") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def reserve(path) -> None:
    """Allocate the whole of the (sparse) file `path` now: a full disk is then an OSError here, not a
    SIGBUS later, when a write through a memory map finds no block. File systems that cannot
    reserve (no fallocate) are left as they are."""
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
