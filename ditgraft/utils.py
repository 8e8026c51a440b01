"""Small shared helpers: atomic file writes, device/thread setup, seeding."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager

import torch


class InputError(ValueError):
    """Bad input to the Python API (``ditgraft.load_model``, ``sample``, ...): the message is the one line the
    command line prints for the same input (where it exits with code 2)."""


def input_error_message(err: BaseException) -> str:
    """The one-line message of an expected error, as the command line prints it."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror}"
    return str(err)


MAX_SEED = 2**32 - 1  # seeds are 32-bit: every derived generator seed stays inside torch's 64-bit range


def check_seed(value, what: str = "seed") -> int:
    """A seed in [0, MAX_SEED], or a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{what}={value!r}: must be an integer in [0, {MAX_SEED}]")
    return value


# what the command line reports as one line with exit 2 (bad input, a run in use, a missing or unwritable path)
EXPECTED_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                   PermissionError)


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path in the same folder; on success rename it onto ``path`` (never a half-written file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # the writer's pid is in the name: an orphan sweep spares the temporaries of live processes
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.p{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        with writing(path):
            yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        pause_inside_write()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_empty_folder(out: str) -> None:
    """``out`` may become a new folder: it is absent or an empty folder."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"out={out!r} exists and is not an empty folder; choose a new folder")


@contextmanager
def atomic_folder(out: str):
    """Yield a temporary folder beside ``out`` (absent or empty); on success it replaces ``out``, on an error or a
    kill it is removed, so no half-written folder is ever left (errors inside name ``out``, see ``writing``)."""
    check_empty_folder(out)
    tmp = out.rstrip("/") + ".tmp-export"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        with writing(out):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(tmp, out)


@contextmanager
def writing(path: str):
    """An error raised while ``path`` is written carries it as ``err.written_path`` (the innermost path wins), so
    that a full disk is reported naming the file or checkpoint that could not be written."""
    try:
        yield
    except Exception as err:
        if getattr(err, "written_path", None) is None:
            try:
                err.written_path = path
            except AttributeError:  # an exception type without attributes: reported without the path
                pass
        raise


def pause_inside_write() -> None:
    """Kill tests (scripts/killtest.py): ``DITGRAFT_TEST_WRITE_PAUSE=seconds`` sleeps after a file or checkpoint
    is written and before it is renamed into place, so a SIGKILL can land inside the write."""
    pause = float(os.environ.get("DITGRAFT_TEST_WRITE_PAUSE", "0") or 0)
    if pause > 0:
        import time

        time.sleep(pause)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str):
    """A JSON file; a torn or invalid one (a kill or a full disk mid-write) is a ValueError naming it."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path} is torn or not valid JSON ({err}); repair or remove it, then run the same "
                         "command again") from None


class UnsafePickle(ValueError):
    """A pickle that names Python code (a class or function outside plain tensors): refused, never run."""


def torch_load_weights(path: str, allowed: tuple = ()):
    """``torch.load(path, weights_only=True)`` (plus the classes in ``allowed``) with one ValueError naming the file:
    a pickle that names Python code is refused (never run), an empty/truncated/corrupt file is named as such."""
    import pickle

    with torch.serialization.safe_globals(list(allowed)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            text = str(err)
            found = re.search(r"(?:unsupported GLOBAL|Unsupported global:?) (?:GLOBAL )?([\w.]+)", text)
            if found:
                raise UnsafePickle(f"{path} was refused: it is a pickle naming {found.group(1)} (Python code, not "
                                 "weights); ditgraft loads only plain tensors, never code") from None
            lines = text.strip().splitlines() or [""]
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (empty, truncated or corrupt: "
                             f"{lines[-3 if len(lines) > 2 else -1][:120]})") from None
        except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError,
                OverflowError, MemoryError) as err:  # garbage bytes reach the unpickler's stack ops in any state
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (empty, truncated or corrupt: "
                             f"{(str(err) or type(err).__name__).splitlines()[0][:200]})") from None


DEVICES = ("cpu", "cuda", "cuda:N", "mps", "auto")  # what ``resolve_device`` accepts
_ALLOWED_DEVICES = ", ".join(repr(d) for d in DEVICES)


def resolve_device(device: str | torch.device | None, option: str = "device") -> torch.device:
    """The one rule from a device name to a torch device: 'auto' (or None) -> cuda if available else cpu; otherwise
    a torch device string of a kind in ``DEVICES`` that exists here. Under torchrun (WORLD_SIZE > 1) an unindexed
    'cuda' is this rank's GPU, cuda:LOCAL_RANK (made the current device). ``option`` names the setting in errors
    (e.g. '--device')."""
    if isinstance(device, torch.device):
        dev = device
    elif device in (None, "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"{option}={device!r} is not a valid torch device; use one of {_ALLOWED_DEVICES} "
                             "(e.g. 'cuda:1')") from err
        if dev.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"{option}={device!r}: ditgraft runs on {_ALLOWED_DEVICES}, not on {dev.type!r}")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"{option}={device!r}: CUDA is not available on this machine (torch "
                                 f"{torch.__version__}); use 'cpu' or 'auto'")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"{option}={device!r}: only {torch.cuda.device_count()} CUDA device(s) here "
                                 f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"{option}={device!r}: MPS is not available on this machine; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev


_ORPHAN_DIR = re.compile(r"step_\d{7}(\.del)?\.tmp$")  # the training loop's checkpoint temporaries
# atomic_path's mkstemp names: .NAME.pPID.XXXXXXXX.tmp (.NAME.XXXXXXXX.tmp before the pid was recorded)
_ORPHAN_FILE = re.compile(r"\..+?(?:\.p(\d+))?\.[A-Za-z0-9_]{8}\.tmp$")


def remove_orphan_temporaries(folder: str, depth: int = 4) -> list[str]:
    """Delete what a killed writer left in ``folder`` (down to ``depth`` levels): checkpoint temporaries
    (``step_NNNNNNN.tmp``) and ``atomic_path`` temporaries (``.NAME.pPID.XXXXXXXX.tmp``) whose writer is not a live
    process; nothing else matches. Subfolders that hold their own run lock belong to another run (live, or swept by
    its own next run) and are never entered. Call it only while holding the folder (its run lock, or as its only
    writer). Returns the removed paths."""
    import shutil

    removed = []
    top = os.path.abspath(folder).rstrip(os.sep).count(os.sep)
    for root, dirs, files in os.walk(folder):
        if os.path.abspath(root).count(os.sep) - top >= depth:
            dirs[:] = []
        dirs[:] = [d for d in dirs if not os.path.exists(os.path.join(root, d, ".ditgraft.lock"))]
        for d in list(dirs):
            if _ORPHAN_DIR.match(d):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
                removed.append(os.path.join(root, d))
                dirs.remove(d)
        for f in files:
            m = _ORPHAN_FILE.match(f)
            if m and not (m.group(1) and _pid_alive(int(m.group(1)))):
                try:
                    os.remove(os.path.join(root, f))
                except FileNotFoundError:  # its writer renamed it into place meanwhile
                    continue
                removed.append(os.path.join(root, f))
    return removed


def check_output_kind(path: str, what: str, folder: bool = True) -> None:
    """A folder output that names a file, or a file output that names a folder, is a ValueError naming ``what``
    (nothing is created: a command checks all its outputs this way before it makes any of them)."""
    if not folder and (os.path.isdir(path) or path.endswith(("/", os.sep))):
        raise ValueError(f"{what}={path!r} is a folder; a file path is expected here")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what}={path!r} is a file; a folder is expected here")


def ensure_writable(path: str, what: str, folder: bool = True) -> None:
    """Fail early (ValueError naming ``what`` and ``path``) when ``path`` (a folder, or a file's folder when
    ``folder`` is False) cannot be created or written, before any long work starts."""
    target = path if folder else (os.path.dirname(os.path.abspath(path)) or ".")
    check_output_kind(path, what, folder)
    try:
        os.makedirs(target, exist_ok=True)
        # not a ".tmp" name: another rank's orphan sweep must not take a probe that is still in use
        fd, probe = tempfile.mkstemp(dir=target, prefix=".ditgraft-write-check.", suffix=".probe")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{what}={path!r} is not writable ({err.strerror or err}); "
                         "choose a folder you can write to") from None


def ensure_empty_folder(path: str, what: str, overwrite: bool = False) -> None:
    """An output folder that is written whole: writable, and refused when it exists with files in it unless
    ``overwrite`` (then its old content is replaced)."""
    ensure_writable(path, what)
    if not overwrite and any(not e.startswith(".ditgraft") for e in os.listdir(path)):
        raise ValueError(f"{what}={path!r} exists and is not empty; choose a new folder, or pass --overwrite to "
                         "replace its content")


class RunLocked(ValueError):
    """Another live process holds the run lock of this output."""


def _lock_path(target: str) -> str:
    if os.path.isdir(target) or not os.path.splitext(target)[1]:
        return os.path.join(target, ".ditgraft.lock")
    return os.path.join(os.path.dirname(os.path.abspath(target)), "." + os.path.basename(target) + ".lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(target: str, command: str = "ditgraft", log=None):
    """Hold ``target`` (a run/output folder, or an output file) for the life of the block.

    The lock file (``FOLDER/.ditgraft.lock``, or ``.NAME.lock`` beside an output file) records pid, host and
    command; it is removed on any exit of the block. A lock left by a dead process of this host is reported and
    taken over; a live holder (or one on another host, which cannot be checked) makes this raise ``RunLocked``
    before anything is written. Under torchrun only rank 0 takes the lock. After taking it, orphan temporaries of
    a killed earlier writer are removed from a locked folder.
    """
    import socket
    import sys

    if int(os.environ.get("RANK", "0")) > 0:
        yield
        return
    path = _lock_path(target)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    host = socket.gethostname()
    mine = {"pid": os.getpid(), "host": host, "command": command}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = read_json(path)
            except (OSError, ValueError):
                holder = {}  # being written right now, or torn by a kill mid-write
            pid, their_host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and their_host == host and not _pid_alive(pid):
                (log or (lambda m: print(m, file=sys.stderr)))(
                    f"{target}: taking over a stale lock of {holder.get('command', '?')} (pid {pid} on {host} "
                    "is no longer running)")
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            who = (f"pid {pid} on host {their_host} ({holder.get('command', '?')})" if pid is not None
                   else f"an unknown process (lock file {path})")
            raise RunLocked(f"{target} is in use by {who}; wait for it to finish or use another output. "
                            f"If that process is gone, delete {path}") from None
        try:
            with writing(path), os.fdopen(fd, "w") as f:
                json.dump(mine, f)
        except BaseException:  # a full disk: an empty lock left here would hold the folder for nobody
            os.remove(path)
            raise
        break
    try:
        if path == os.path.join(target, ".ditgraft.lock"):
            remove_orphan_temporaries(target)
        else:  # an output file: only its own atomic_path temporaries
            folder, name = os.path.split(os.path.abspath(target))
            own = re.compile(re.escape("." + name) + r"(?:\.p(\d+))?\.[A-Za-z0-9_]{8}\.tmp$")
            for f in os.listdir(folder):
                m = own.match(f)
                if m and not (m.group(1) and _pid_alive(int(m.group(1)))):
                    os.remove(os.path.join(folder, f))
        yield
    finally:
        try:
            if read_json(path).get("pid") == os.getpid():
                os.remove(path)
        except (OSError, ValueError):
            pass


def non_finite_tensors(*modules: torch.nn.Module | dict | None) -> list[str]:
    """Names of the floating-point parameters/buffers (of modules or state dicts) holding NaN or Inf (empty when all
    are finite)."""
    bad = []
    for m in modules:
        if m is None:
            continue
        for name, t in (m if isinstance(m, dict) else m.state_dict()).items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(name)
    return bad
