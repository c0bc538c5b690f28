"""What every entry point does with a user error: one line on stderr (main process only; the others' go to
torchrun's failure summary), exit code 2."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from rlt.errors import ConfigError
from rlt.logging_utils import rank

logger = logging.getLogger(__name__)

USER_ERROR_EXIT = 2


@contextlib.contextmanager
def user_errors(prog: str):
    """Turn a ConfigError (bad key, value, file or row) into one line on stderr and exit code 2."""
    try:
        yield
    except ConfigError as e:
        msg = " ".join(str(e).split("\n")[0].split())
        # rank from the launcher's environment: the error may come before accelerate's state; a RANK without
        # torchrun (inherited from a cluster's job) prints too, as nothing else would
        if rank() == 0 or not os.environ.get("TORCHELASTIC_ERROR_FILE"):
            sys.stderr.write(f"{prog}: error: {msg}\n")
            sys.stderr.flush()
        else:
            # Another rank stays quiet (every rank usually meets the same error); its message goes to the error
            # file torchrun reads, so the failure summary names it when rank 0 did not fail the same way.
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(ConfigError(f"{prog}: error: {msg}"))
        raise SystemExit(USER_ERROR_EXIT) from None


def check_writable(path: str | Path, what: str = "output_dir") -> None:
    """Create ``path`` (a directory) if needed and prove a file can be written there."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".rlt-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what}={path}: cannot write there ({e.strerror or e})") from None


def refuse_directories(paths, what: str) -> None:
    """None of ``paths`` (files a run writes beside its output) is a directory; else one line that starts with
    ``what`` (the setting, e.g. ``output_dir=DIR``)."""
    for path in paths:
        if Path(path).is_dir():
            raise ConfigError(f"{what}: {path}, written there, is a directory; move it away or choose another")


def check_writable_file(path: str | Path, what: str = "output") -> None:
    """``path`` is not a directory, and the directory it is written in exists (or is created) and is writable."""
    if Path(path).is_dir():
        raise ConfigError(f"{what}={path} is a directory: give a file path")
    check_writable(Path(path).parent if str(Path(path).parent) else ".", what=f"{what}={path}: its directory")


def append_jsonl_synced(f, rows: list[dict]) -> None:
    """``rows`` as JSON lines in one write, flushed and synced: a crash tears at most this write's last line."""
    f.write("".join(json.dumps(r) + "\n" for r in rows))
    f.flush()
    os.fsync(f.fileno())


def without_torn_line(path: Path, data: bytes) -> bytes:
    """``data`` (the bytes of ``path``, a JSON-lines file appended to by ``append_jsonl_synced``) up to its last
    newline: a last line without one was torn by a writer that died mid-write. Cutting it off is logged."""
    if not data or data.endswith(b"\n"):
        return data
    cut = data.rfind(b"\n") + 1
    logger.warning("%s: removing a torn last line (%d bytes) left by an interrupted run", path, len(data) - cut)
    return data[:cut]


def write_json_atomic(path: Path, value) -> None:
    """``value`` as indented JSON in ``path`` (values JSON lacks, such as paths, as text), through a temporary
    file renamed over it: a kill or a full disk leaves the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(value, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path, default=None):
    """The JSON in ``path`` (``default`` when there is no such file); unreadable JSON is one ConfigError naming
    the file."""
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); it was cut off or edited: restore it or remove it") from None


def check_same_settings(path: Path, settings: dict, what: str, keep: str, missing: str | None = None) -> None:
    """The settings recorded in ``path`` (JSON) must equal ``settings``, or one ConfigError: "``what`` with other
    settings (the keys that differ); ``keep``". An unreadable file is one too; a missing one is the warning
    ``missing`` (None: an error)."""
    from rlt.runs import changed_keys

    if not Path(path).exists():
        if missing is None:
            raise ConfigError(f"{what}, but its settings file {path} is missing; {keep}")
        logger.warning("%s", missing)
        return
    try:
        before = read_json(path)
    except ConfigError:
        raise ConfigError(f"{path}: unreadable (cut off?); {keep}") from None
    changed = changed_keys(before, settings)
    if changed:
        raise ConfigError(f"{what} with other settings ({', '.join(changed)} differ); {keep}")
