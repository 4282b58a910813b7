"""What every throwaway server shares: free ports, temp dirs, running tools, waiting, killing
whole process trees, and cleanup at interpreter exit.

Every server lives in its own temp dir on a free 127.0.0.1 port (its Unix socket in that temp dir
too), never touches a system server, and is torn down by ``cleanup()``, by ``with``, or at
interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"
_LOG_TAIL_LINES = 40
COMMAND_TIMEOUT = 120.0  # seconds for one psql/mariadb client run
_PORT_IN_USE = re.compile(r"already in use|Bind on TCP/IP port|errno: 98", re.IGNORECASE)


class ServerStartError(RuntimeError):
    """A throwaway server could not be set up, started or stopped."""


class CommandError(RuntimeError):
    """A command-line client (psql, mariadb) or server tool exited with an error."""

    def __init__(self, what: str, returncode: int, stderr: str) -> None:
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{what} failed (exit {returncode}): {stderr.strip()}")


def free_port() -> int:
    """A port nobody listens on right now (the caller retries if someone takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def is_root() -> bool:
    return os.geteuid() == 0


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def with_log(message: str, log: Path) -> str:
    return f"{message}\n--- last lines of {log} ---\n{_tail(log)}"


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _proc_stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, ppid, pgrp) of a live-or-zombie process, None if it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.find("(") + 1 : raw.rfind(")")]
    state, ppid, pgrp = raw[raw.rfind(")") + 2 :].split()[:3]
    return comm, state, int(ppid), int(pgrp)


def alive(pid: int) -> bool:
    """True if pid is a running (not zombie) process; zombies hold no memory or sockets."""
    if not Path("/proc/self/stat").exists():  # not Linux: best effort
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    info = _proc_stat(pid)
    return info is not None and info[1] not in ("Z", "X")


def _process_tree(root: int) -> set[int]:
    """root plus every live descendant and member of its process group."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self").exists() else ():
        if entry.name.isdigit():
            info = _proc_stat(int(entry.name))
            if info is not None and info[1] not in ("Z", "X"):
                table[int(entry.name)] = (info[2], info[3])
    found = {root}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, pgrp) in table.items():
            if pid not in found and (ppid in found or pgrp == root):
                found.add(pid)
                changed = True
    return found


def kill_tree(root: int, timeout: float = 15.0, before: Callable[[], None] | None = None) -> None:
    """SIGKILL a process and everything it started, and wait until all of them are gone.

    All are stopped first, so none sees another die and reacts (a PostgreSQL backend would
    flush what it had buffered and say goodbye): a crash of the whole host, where no server
    process sends a last word.

    before: called once the tree is known, right before the first signal (a caller timing
    the crash should not count the scan of /proc).
    """
    pids = _process_tree(root)
    if before is not None:
        before()

    def signal_all(sig: signal.Signals) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    signal_all(signal.SIGSTOP)
    pids |= _process_tree(root)  # children forked before the root stopped
    signal_all(signal.SIGSTOP)
    signal_all(signal.SIGKILL)
    if not wait_until(lambda: not any(alive(p) for p in pids), timeout):
        raise ServerStartError(f"processes {sorted(p for p in pids if alive(p))} survived SIGKILL")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def find_binary(names: Iterable[str], dirs: Iterable[Path | str] = ()) -> str:
    names = list(names)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    for d in dirs:
        for name in names:
            candidate = Path(d) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise ServerStartError(f"none of {names} found on PATH or in {[str(d) for d in dirs]}")


def _temp_base() -> Path:
    """Where to put temp dirs: short enough for Unix socket paths, reachable by postgres."""
    base = Path(tempfile.gettempdir()).resolve()
    if len(str(base)) > 60:  # sun_path is 108 bytes; leave room for dir and socket names
        return Path("/tmp")
    if is_root():
        for part in (base, *base.parents):
            if not part.stat().st_mode & stat.S_IXOTH:  # postgres could not traverse it
                return Path("/tmp")
    return base


def clean_env(drop_prefixes: tuple[str, ...], **extra: str) -> dict[str, str]:
    """os.environ minus variables that would redirect a client or tool to another server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}
    env.update(extra)
    return env


def run(
    cmd: list[str],
    what: str,
    *,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    cwd: Path | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> str:
    try:
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(what, -1, f"timed out after {timeout}s") from exc
    if proc.returncode != 0:
        raise CommandError(what, proc.returncode, proc.stderr or proc.stdout)
    return proc.stdout


def strip_final_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


# ------------------------------------------------------------------ exit-time cleanup

_live: set[Server] = set()
_live_lock = threading.Lock()


@atexit.register
def _cleanup_all() -> None:
    """An interrupted test run (Ctrl-C, failed session) must not leave servers behind."""
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.cleanup()


class Server:
    """Temp-dir bookkeeping, exit-time cleanup and context management shared by both engines."""

    host: str = HOST
    port: int
    data_dir: Path
    base_dir: Path
    startup_timeout: float = 60.0

    def __init__(self, prefix: str, port: int | None) -> None:
        self._lock = threading.RLock()
        self._owner_pid = os.getpid()  # a forked child must not clean up its parent's servers
        self._cleaned = False
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self.base_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=_temp_base()))
        with _live_lock:
            _live.add(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(port={self.port}, base_dir={str(self.base_dir)!r})"

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def start(self) -> Self:
        raise NotImplementedError

    def _check_usable(self) -> None:
        if self._cleaned:
            raise ServerStartError(f"{self!r} was cleaned up; create a new one")

    def _shutdown_for_cleanup(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Stop the server if it runs and delete its temp dir; safe to call any number of times."""
        with self._lock:
            if self._cleaned or os.getpid() != self._owner_pid:
                return
            try:
                self._shutdown_for_cleanup()
            finally:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self._cleaned = True
                with _live_lock:
                    _live.discard(self)

    def _start_with_port_retry(self, start_once: Callable[[], None], log: Path) -> None:
        """Start; if we picked the port ourselves and lost the race for it, pick another."""
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            offset = _size(log)
            try:
                start_once()
                self._auto_port = False  # restarts keep the port clients were told about
                return
            except ServerStartError:
                lost_port = _PORT_IN_USE.search(_read_from(log, offset))
                if not (lost_port and attempt + 1 < attempts):
                    raise
                self.port = free_port()
