"""A Redis server for the shared embedding store, started beside TorchServe by
``samserve-serve start --redis``.

It runs as the deployment files run one (``maxmemory`` with ``allkeys-lru``, no
persistence, a password), from the server's ``run/`` folder: its config, pid file, log
and the store URL with the password (``store_url``, readable by this user only) live
there, so that ``stop`` finds it and other hosts can be given the URL.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 6379
DEFAULT_MAXMEMORY_MB = 1024
PID_FILE = "redis.pid"


@dataclass(frozen=True)
class StoreServer:
    """A redis-server's files in ``workdir`` and where it listens.

    Arguments:
      workdir (Path): the TorchServe run folder (``redis.conf``, ``redis.pid``,
        ``redis.log`` and ``store_url`` go there).
      port (int): its TCP port.
      bind (str): the address it listens on; loopback unless other hosts share it.
      maxmemory_mb (int): its memory bound, past which it evicts least recently used keys.
    """

    workdir: Path
    port: int = DEFAULT_PORT
    bind: str = "127.0.0.1"
    maxmemory_mb: int = DEFAULT_MAXMEMORY_MB

    @property
    def url_file(self) -> Path:
        """The file that holds the store's URL, with its password."""
        return self.workdir / "store_url"

    def start(self, timeout: float = 10.0) -> str:
        """Start the server (a running one of this folder is stopped first) and wait until
        it answers; returns the store URL, with its new password, also written to
        ``store_url``.

        Raises:
          FileNotFoundError: no ``redis-server`` on the PATH (``scripts/setup.sh``
            installs Debian's).
          RuntimeError: it did not answer within ``timeout`` seconds (its log's tail).
        """
        executable = shutil.which("redis-server")
        if executable is None:
            raise FileNotFoundError("redis-server is not installed (bash scripts/setup.sh)")
        self.stop()
        self.workdir.mkdir(parents=True, exist_ok=True)
        password = secrets.token_hex(16)
        config = self.workdir / "redis.conf"
        folder = self.workdir.resolve()
        config.write_text(
            f"port {self.port}\nbind {self.bind}\ndir {folder}\n"
            f"pidfile {folder / PID_FILE}\nlogfile {folder / 'redis.log'}\n"
            f'daemonize yes\nsave ""\nappendonly no\nmaxmemory {self.maxmemory_mb}mb\n'
            f"maxmemory-policy allkeys-lru\nrequirepass {password}\n"
        )
        config.chmod(0o600)  # it holds the password
        subprocess.run([executable, str(config)], check=True)
        wait_until_answering(self.port, self.workdir / "redis.log", timeout)
        host = socket.gethostname() if self.bind == "0.0.0.0" else self.bind
        url = f"redis://:{password}@{host}:{self.port}/0"
        self.url_file.write_text(url + "\n")
        self.url_file.chmod(0o600)
        return url

    def stop(self) -> bool:
        """Stop the server this folder started, if it runs; whether one was stopped."""
        try:
            pid = int((self.workdir / PID_FILE).read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            return False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        (self.workdir / PID_FILE).unlink(missing_ok=True)
        self.url_file.unlink(missing_ok=True)
        return True


def wait_until_answering(
    port: int, log: Path, timeout: float = 10.0, alive: Callable[[], bool] | None = None
) -> None:
    """Return once a redis-server answers PING on loopback ``port`` (NOAUTH counts: it is
    up).

    Arguments:
      port (int): the port it listens on.
      log (Path): its log file, whose tail the error quotes.
      timeout (float): seconds to wait at most.
      alive (callable or None): whether its process still runs; the wait ends at once
        when it does not. None: not known (a daemon).

    Raises:
      RuntimeError: it did not answer in time, or its process ended (its log's tail).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (alive is None or alive()):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    tail = log.read_text()[-2000:] if log.exists() else ""
    raise RuntimeError(f"redis-server did not answer on port {port}:\n{tail}")
