"""
Files written atomically and by one writer at a time: temporary names renamed into place, OS
locks (flock) naming their holder, JSON in and out, free disk space, and memory-mapped pages let go.
"""
import fcntl
import glob
import json
import math
import mmap
import os
import shutil
import time
from contextlib import contextmanager

from knnlm import KnnlmError


@contextmanager
def atomic_write(path):
    """Yield a temporary name beside path, rename it to path once written: a crash
    never leaves half a file under the final name (and the next write removes what a
    killed writer left). A failed write (a full disk) is a KnnlmError."""
    path = os.path.realpath(path)  # through a symlink: the file it names is replaced, not the link
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        remove_stale_tmp(glob.escape(path))
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise KnnlmError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_tmp(pattern):
    """Remove the files pattern.tmpPID whose writer (process PID) is dead: a kill -9 left them."""
    for tmp in glob.glob(pattern + ".tmp[0-9]*"):
        pid = tmp.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            os.remove(tmp)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


# One writer at a time. Every script that writes a datastore directory, a checkpoint or a
# results file first takes an OS file lock (flock) on a lock file: in the directory, or
# beside the file. The OS releases it when the process ends however it ends, so a kill -9
# never leaves a stale lock; a second writer is refused in one line naming the holder.
_held_locks = {}  # lock file -> descriptor, the locks this process holds


def lock_path(path, directory):
    path = os.path.realpath(path)  # one lock for a file however it is named (a symlink, ../x)
    if directory:
        return os.path.join(path, ".lock")
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.lock")


@contextmanager
def writing(path, directory=False, patience=0.5):
    """Be the only process writing `path` (a directory, or a file) while inside; the temporary files a
    killed writer left there are removed. Creating the lock checks up front that path can be written.
    Reentrant: inside, the same process may take it again (a script and the library it calls)."""
    lock = lock_path(path, directory)
    if lock in _held_locks:
        yield
        return
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise KnnlmError(f"{path} is a file, not a directory")
    if not directory and os.path.isdir(path):
        raise KnnlmError(f"{path} is a directory, not a file")
    try:
        os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise KnnlmError(f"cannot write to {os.path.dirname(lock) or '.'}: {e.strerror}") from None
    deadline = time.time() + patience  # a reader peeking at the lock (writer_pid) holds it for microseconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() < deadline:
                time.sleep(0.02)
                continue
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise KnnlmError(f"{path} is being written by another process"
                             f"{f' (pid {holder})' if holder else ''}: wait for it to end, or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held_locks[lock] = fd
    try:
        remove_stale_tmp(glob.escape(path) + ("/*" if directory else ""))
        yield
    finally:
        del _held_locks[lock]
        os.close(fd)  # releases the lock


def writer_pid(path, directory=False):
    """The pid of another process writing path now (as a string), or None."""
    lock = lock_path(path, directory)
    if lock in _held_locks:
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)


def json_ready(obj, where=""):
    """-> (obj with every NaN or infinite float replaced by None, {where: "inf" | "-inf" | "nan"})."""
    if isinstance(obj, dict):
        pairs = [(k, json_ready(v, f"{where}.{k}" if where else str(k))) for k, v in obj.items()]
        return {k: v for k, (v, _) in pairs}, {p: w for _, (_, bad) in pairs for p, w in bad.items()}
    if isinstance(obj, (list, tuple)):
        items = [json_ready(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return [v for v, _ in items], {p: w for _, bad in items for p, w in bad.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, {where: str(obj)}
    return obj, {}


def write_json(obj, path):
    """Standard JSON, written atomically. A NaN or infinite number becomes null, and a dict
    records which ones in "non_finite" (e.g. {"knnlm_ppl.test": "inf"})."""
    obj, bad = json_ready(obj)
    if bad and isinstance(obj, dict):
        obj["non_finite"] = bad
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")


def read_json(path, fields=None):
    """A JSON object; fields ({name: type}) are checked to be there with those types."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise KnnlmError(f"cannot read {path}: {e}") from None
    if fields is not None:
        if not isinstance(obj, dict):
            raise KnnlmError(f"{path} holds a JSON {type(obj).__name__}, not the object expected")
        for name, kind in fields.items():
            if not isinstance(obj.get(name), kind) or (kind is int and isinstance(obj.get(name), bool)):
                raise KnnlmError(f"{path} is not what it should be: field {name!r} is {obj.get(name)!r}")
    return obj


def check_same(wanted, found, wanted_name, found_name):
    """Refuse, in one line naming both sides, the first field where found differs from wanted."""
    for field, value in wanted.items():
        if found.get(field) != value:
            raise KnnlmError(f"{field} differs: {found_name} has {found.get(field)!r}, {wanted_name} "
                             f"{'have' if wanted_name.endswith('arguments') else 'has'} {value!r}")


def check_disk_space(path, needed, what="the datastore"):
    free = shutil.disk_usage(path).free
    if free < needed:
        raise KnnlmError(f"not enough disk space in {path}: {what} needs {needed / 1e9:.2f} GB, "
                         f"{free / 1e9:.2f} GB are free")


def release_pages(memmap):
    """Drop the pages of a memory-mapped file that this process has read from its resident memory
    (the OS keeps them cached). A pass over keys larger than RAM then holds one batch at a time."""
    memmap._mmap.madvise(mmap.MADV_DONTNEED)
