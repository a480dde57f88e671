"""User-facing errors.

A ZsdError carries one sentence that tells the user what is wrong and what to pass instead;
the CLI prints it without a traceback. So it does a full or read-only file system (`disk_error`).
Anything else that escapes is a bug and keeps its traceback.
"""

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


class ZsdError(Exception):
    pass


@contextmanager
def out_of_memory(device, what: str, fix: str):
    """Running out of device memory inside, as one line: "out of memory on DEVICE in WHAT: FIX"."""
    import torch  # the CLI's error path stays importable without torch
    try:
        yield
    except torch.OutOfMemoryError:
        raise ZsdError(f"out of memory on {device} in {what}: {fix}") from None


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


def is_run_folder(folder) -> bool:
    return (Path(folder) / "student.json").is_file() or (Path(folder) / "train_state.pt").is_file()


def check_outputs(outputs, inputs=(), flag: str = "--out", may_be: str | None = None) -> None:
    """Refuse, in one line and before any work, an output path that would damage data:

    - one of the command's own `inputs` (files, or folders such as stores that it reads), or a
      path inside an input folder (an image source, a store) or inside an image source recorded
      by an input store;
    - a path inside (or equal to) a Zarr hierarchy such as a zsd store: a report written over
      its zarr.json or a chunk destroys it;
    - a file of a zsd run folder.

    `may_be`: "store" when the output is itself a store the command writes (cache-teacher --out),
    "run" when it is a run folder (train --out: new, empty or a run folder; never a store or a
    folder of other files such as images).
    """
    ins = [Path(p) for p in inputs if p is not None and Path(p).exists()]
    ins += [Path(root) for p in ins for root in store_source_roots(p)]
    for out in map(Path, outputs):
        target = out.resolve()
        folder = target.parent
        if out.name in RUN_FILES and is_run_folder(folder):
            raise ZsdError(f"{flag}: writing {out} would overwrite {out.name} of the run in {folder}: "
                           "choose another path")
        for place in [target, *target.parents]:
            if (place / "zarr.json").is_file() and not (may_be == "store" and place == target):
                raise ZsdError(f"{flag}: {out} is {'' if place == target else 'inside '}the store {place}; "
                               "writing there would damage it: choose a path outside it")
        for given in ins:
            if target == given.resolve() or (out.exists() and os.path.samefile(out, given)):  # links too
                raise ZsdError(f"{flag}: writing {out} would overwrite {given}, an input of this command: "
                               "choose another path")
            if given.is_dir() and given.resolve() in target.parents and not is_run_folder(given):  # RUN/eval is fine
                raise ZsdError(f"{flag}: {out} is inside {given}, an input of this command (images or a store) "
                               "that writing there would change: choose a path outside it")
        if may_be == "run" and target.is_dir() and not RUN_FILES & set(os.listdir(target)) \
                and any(not name.startswith(".") for name in os.listdir(target)):
            raise ZsdError(f"{flag}: {out} holds other files and is no zsd run folder: choose a new or empty "
                           "folder (or an earlier run's, to continue it)")


def store_source_roots(path) -> list[str]:
    """The image folders, manifests and shards recorded in the zsd store at `path` (none if it is no
    store): a command that reads the store reads them too. A manifest's folder is left out: it may be
    any working folder."""
    try:
        sources = json.loads((Path(path) / "zarr.json").read_text())["attributes"]["zsd"]["sources"]
        return [str(p) for d in sources
                for p in ([d["root"]] if d["kind"] in ("folder", "flat") else [d.get("path")] + d.get("shards", []))
                if p]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def temp_path(path) -> Path:
    """A temporary name beside `path`, unique to this process. Short where `path`'s own name is
    long: a legal name plus a suffix may pass the file system's 255 bytes."""
    path = Path(path)
    name = f".{path.name}.{os.getpid()}.tmp"
    if len(os.fsencode(name)) > 255:
        name = f".zsd-{os.getpid()}-{abs(hash(path.name)):x}.tmp"
    return path.with_name(name)


@contextmanager
def writing_in(folder):
    """An OSError that names no file (a failed write() does not) names `folder`, so a full disk's
    one-line error says where."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(folder)
        raise


@contextmanager
def atomic_file(path):
    """`with atomic_file(path) as tmp:` write `tmp` (a file or a folder); it becomes `path` when the
    block ends and is removed when the block raises or is interrupted, so `path` appears whole or
    not at all. Two processes writing one `path` each write their own temporary name. What it
    holds gets the modes of files the user creates (`usual_modes`)."""
    path = Path(path)
    tmp = temp_path(path)
    _remove(tmp)  # left by a killed process whose pid this one reuses (pid 1 in every container)
    try:
        with writing_in(path.parent):  # not `path`: in nested blocks the write that failed may be another's
            yield tmp
            usual_modes(tmp)
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def umask() -> int:
    """The process's umask, read without changing it where Linux tells (/proc), so no thread's new file
    meanwhile gets another mode."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_modes(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the mode a plain `open`/`mkdir` gives under the
    umask: libraries that write through a temporary file of their own (safetensors' `save_file`,
    `tempfile.mkstemp`) leave 0600, which hides a published model from the other users of a machine."""
    mask = umask()
    for p in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path, content: bytes | str, flag: str = "--out") -> None:
    """`path` whole or not at all (`atomic_file`); a failed write is a ZsdError naming `flag`."""
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            if isinstance(content, str):
                tmp.write_text(content, encoding="utf-8")
            else:
                tmp.write_bytes(content)
    except OSError as e:
        raise ZsdError(f"{flag}: cannot write {path} ({e.strerror or e}); nothing was written") from None


# A full or read-only file system while a command writes: the user's to fix, not a bug. The CLI
# prints these as one line wherever they arise; the write that failed left no file behind.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def disk_error(e: BaseException) -> OSError | None:
    """The OSError of a full or read-only file system behind `e` (torch.save wraps it in a
    RuntimeError), or None."""
    for err in (e, e.__context__, e.__cause__):
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
            return err
    return None


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
