"""Start, health-check and stop a TorchServe instance with the project's settings.

Each instance lives in its own working directory: its key file, logs, pid file (under
``TMPDIR``, which TorchServe's launcher honours) and worker sockets stay there, so a
test server and a demo server never step on each other. An instance listens where its
config.properties says, unless it is given ports of its own (tests, benchmarks).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

from .keys import KEY_FILE_NAME, Keys, KeySource, load_keys

# The server's settings in the current directory, as ``torchserve --ts-config`` is given
# them where it runs (the project's checkout, for scripts/serve.py and samserve-serve).
DEFAULT_CONFIG = Path("config.properties")

WORKER_SPIN_COUNT = "20000"
"""``GOMP_SPINCOUNT`` for the workers, unless the environment sets one: how long torch's
idle OpenMP threads spin after each parallel op before they sleep. libgomp's default
(300,000 pauses; about 15 ms where a pause costs ~140 cycles, as on recent Xeons) keeps
a core busy after the decoder's last op, while the mask pool's threads make and encode
that call's masks on the same cores. 20,000 still spans the gaps between a decoder's ops.
Measured in-process, 16-click vit_b requests on 2 Xeon cores: 488-505 -> 436-461 ms."""


@dataclass(frozen=True)
class Ports:
    """The five listening ports and the first worker port of one instance."""

    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071
    worker: int = 9000

    @classmethod
    def offset(cls, delta: int) -> Ports:
        """The default ports shifted by ``delta`` (tests use a block of their own)."""
        base = cls()
        return cls(*(getattr(base, f) + delta for f in cls.__dataclass_fields__))


@dataclass(frozen=True)
class Addresses:
    """Where a client on this machine reaches one TorchServe instance (TorchServe's
    defaults unless its config.properties says otherwise)."""

    inference_url: str = "http://127.0.0.1:8080"
    management_url: str = "http://127.0.0.1:8081"
    metrics_url: str = "http://127.0.0.1:8082"
    grpc_inference_host: str = "127.0.0.1"
    grpc_inference_port: int = 7070
    grpc_management_host: str = "127.0.0.1"
    grpc_management_port: int = 7071

    @classmethod
    def from_properties(cls, properties: Mapping[str, str]) -> Addresses:
        """The addresses a config.properties (as a dict) makes TorchServe listen on; one
        bound to every interface (``0.0.0.0``, ``::``) is reached through loopback."""
        default = cls()
        return cls(
            inference_url=_reachable_url(
                properties.get("inference_address"), default.inference_url
            ),
            management_url=_reachable_url(
                properties.get("management_address"), default.management_url
            ),
            metrics_url=_reachable_url(properties.get("metrics_address"), default.metrics_url),
            grpc_inference_host=_reachable_host(
                properties.get("grpc_inference_address") or default.grpc_inference_host
            ),
            grpc_inference_port=int(
                properties.get("grpc_inference_port") or default.grpc_inference_port
            ),
            grpc_management_host=_reachable_host(
                properties.get("grpc_management_address") or default.grpc_management_host
            ),
            grpc_management_port=int(
                properties.get("grpc_management_port") or default.grpc_management_port
            ),
        )

    @classmethod
    def from_config(cls, config: str | os.PathLike = DEFAULT_CONFIG) -> Addresses:
        """The addresses of a server started with the config.properties at ``config``."""
        return cls.from_properties(read_properties(config))

    @classmethod
    def find(
        cls, config: str | os.PathLike | None = None, default: str | os.PathLike = DEFAULT_CONFIG
    ) -> Addresses:
        """The addresses of a server as a client finds them.

        Arguments:
          config: the server's config.properties, which must exist.
          default: without ``config``, the config.properties to read if it exists.

        Returns:
          The addresses the config gives, or TorchServe's defaults without one.
        """
        if config is not None:
            return cls.from_config(config)
        return cls.from_config(default) if Path(default).is_file() else cls()

    @classmethod
    def on_ports(cls, ports: Ports, host: str = "127.0.0.1") -> Addresses:
        """The addresses of an instance given its own ports on ``host``."""
        return cls(
            inference_url=f"http://{host}:{ports.inference}",
            management_url=f"http://{host}:{ports.management}",
            metrics_url=f"http://{host}:{ports.metrics}",
            grpc_inference_host=host,
            grpc_inference_port=ports.grpc_inference,
            grpc_management_host=host,
            grpc_management_port=ports.grpc_management,
        )


def read_properties(path: str | os.PathLike) -> dict[str, str]:
    """The ``key=value`` settings of a Java properties file such as config.properties.

    Arguments:
      path: the file.

    Returns:
      Each key's value, stripped; comment lines (``#``, ``!``) are skipped.
    """
    properties = {}
    for line in Path(path).read_text().splitlines():
        text = line.strip()
        if not text or text[0] in "#!" or "=" not in text:
            continue
        key, value = text.split("=", 1)
        properties[key.strip()] = value.strip()
    return properties


def _reachable_host(host: str) -> str:
    """``host`` as a client connects to it: a wildcard bind through loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "[::1]"}.get(host, host)


def _reachable_url(address: str | None, default: str) -> str:
    """A listen address of config.properties (``http://0.0.0.0:8080``) as a client's URL."""
    parts = urlsplit(address or default)
    host = parts.hostname or "127.0.0.1"
    reachable = _reachable_host(host)
    if reachable == host:
        return (address or default).rstrip("/")
    if ":" in reachable:
        reachable = f"[{reachable}]"
    netloc = f"{reachable}:{parts.port}" if parts.port else reachable
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")


class TorchServe:
    """One TorchServe process tree, configured from ``config.properties``.

    With ``ports``, the instance listens on them on ``host`` whatever the file says
    (tests and benchmarks run beside a user's server); without, it listens where the file
    (and ``overrides``) say, as ``torchserve --ts-config`` would.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        model_store: str | os.PathLike,
        ports: Ports | None = None,
        config: str | os.PathLike = DEFAULT_CONFIG,
        overrides: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.model_store = Path(model_store).resolve()
        self.ports = ports
        self.config = Path(config)
        self.overrides = overrides or {}
        self.host = host

    @property
    def addresses(self) -> Addresses:
        """Where clients on this machine reach the instance."""
        if self.ports is not None:
            return Addresses.on_ports(self.ports, self.host)
        return Addresses.from_properties({**read_properties(self.config), **self.overrides})

    @property
    def inference_url(self) -> str:
        return self.addresses.inference_url

    @property
    def management_url(self) -> str:
        return self.addresses.management_url

    @property
    def metrics_url(self) -> str:
        return self.addresses.metrics_url

    @property
    def key_file(self) -> Path:
        """Where the instance writes its keys (TorchServe: its working directory)."""
        return self.workdir / KEY_FILE_NAME

    @property
    def tmpdir(self) -> Path:
        return self.workdir / "tmp"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def keys(self) -> Keys:
        """The running instance's tokens (empty when authorization is disabled)."""
        return load_keys(self.workdir)

    def key_source(self) -> KeySource:
        """The instance's key file as clients' key source: re-read, and renewed through
        the token API, when a key expires."""
        return KeySource(self.key_file)

    def write_config(self) -> Path:
        """The instance's config: the project's file with this instance's paths (its
        ``vmargs`` keep the file's JVM options and add this instance's tmpdir; a relative
        ``metrics_config`` is made absolute from the file's directory), its ``ports`` where
        it has its own, and ``overrides``."""
        config = self.config.read_text().splitlines()
        keyed = {line.split("=", 1)[0].strip(): line for line in config if "=" in line}
        vmargs = keyed["vmargs"].split("=", 1)[1].strip() if "vmargs" in keyed else ""
        values = {
            "model_store": str(self.model_store),
            "vmargs": f"{vmargs} -Djava.io.tmpdir={self.tmpdir}".strip(),
        }
        metrics_config = read_properties(self.config).get("metrics_config")
        if metrics_config:
            # TorchServe reads a relative path from its working directory, the instance's;
            # the file's is relative to the config that names it.
            values["metrics_config"] = str((self.config.parent / metrics_config).resolve())
        if self.ports is not None:
            p, h = self.ports, self.host
            values |= {
                "inference_address": f"http://{h}:{p.inference}",
                "management_address": f"http://{h}:{p.management}",
                "metrics_address": f"http://{h}:{p.metrics}",
                "grpc_inference_address": h,
                "grpc_management_address": h,
                "grpc_inference_port": str(p.grpc_inference),
                "grpc_management_port": str(p.grpc_management),
                "initial_worker_port": str(p.worker),
            }
        values |= self.overrides
        lines = [line for line in config if line.split("=", 1)[0].strip() not in values]
        lines += [f"{key}={value}" for key, value in values.items()]
        path = self.workdir / "config.properties"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TMPDIR=str(self.tmpdir),
            LOG_LOCATION=str(self.log_dir),
            METRICS_LOCATION=str(self.log_dir),
        )
        # Workers inherit the frontend's environment, and libgomp reads this once, when
        # torch loads (see WORKER_SPIN_COUNT).
        env.setdefault("GOMP_SPINCOUNT", WORKER_SPIN_COUNT)
        # The worker must run in the Python that has the handler's dependencies.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _torchserve(self, *args: str) -> subprocess.CompletedProcess:
        exe = shutil.which("torchserve", path=self._env()["PATH"]) or "torchserve"
        with open(self.workdir / "frontend.log", "ab") as log:
            return subprocess.run(
                [exe, *args],
                cwd=self.workdir,
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            )

    def pid(self) -> int | None:
        """PID of the running frontend (java), from the pid file, if alive."""
        try:
            pid = int((self.tmpdir / ".model_server.pid").read_text().split()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    def worker_pids(self) -> dict[int, int]:
        """The running backend workers as ``{worker port: pid}``.

        Workers are the frontend's child processes running ``model_service_worker``; each
        listens on the socket ``.ts.sock.<port>``, and ``<port>`` is the worker ``id`` that
        the management API's describe call shows for the model.
        """
        frontend = self.pid()
        if frontend is None:
            return {}
        workers = {}
        for child in _children(frontend):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            args = cmdline.decode(errors="replace").split("\0")
            if not any("model_service_worker" in arg for arg in args) or "--sock-name" not in args:
                continue
            port = re.search(r"(\d+)$", args[args.index("--sock-name") + 1])
            if port:
                workers[int(port.group(1))] = child
        return workers

    def start(self, models: str | None = None, timeout: float = 120) -> None:
        """Start TorchServe (``--ncs``: no snapshots) and wait until /ping is healthy."""
        if self.pid() is not None:
            raise RuntimeError(f"TorchServe already runs from {self.workdir} (pid {self.pid()})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tmpdir.mkdir(exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        args = ["--start", "--ncs", "--ts-config", str(self.write_config())]
        args += ["--model-store", str(self.model_store)]
        if models:
            args += ["--models", models]
        result = self._torchserve(*args)
        if result.returncode != 0:
            raise RuntimeError(f"torchserve --start failed; see {self.workdir / 'frontend.log'}")
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 120) -> None:
        """Poll GET /ping (with the inference token) until it says Healthy."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.pid() is None and time.monotonic() > deadline - timeout + 5:
                raise RuntimeError(f"TorchServe exited; see {self.log_dir / 'ts_log.log'}")
            try:
                response = requests.get(
                    f"{self.inference_url}/ping", headers=self.keys().header("inference"), timeout=2
                )
                if response.ok and response.json().get("status") == "Healthy":
                    return
                last = response.text
            except (requests.RequestException, ValueError) as err:
                last = str(err)
            time.sleep(0.25)
        raise TimeoutError(f"TorchServe not healthy after {timeout}s: {last}")

    def stop(self, timeout: float = 30) -> None:
        """Stop TorchServe and wait for the frontend and its workers to exit."""
        pid = self.pid()
        if pid is None:
            return
        workers = _children(pid)
        self._torchserve("--stop")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        for leftover in [pid, *workers]:
            if _alive(leftover):
                os.kill(leftover, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and re.search(r"State:\s+Z", status.read_text()))


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except OSError:
        return []
    return [int(p) for p in out.split()]
