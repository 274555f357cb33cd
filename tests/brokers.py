"""The RabbitMQ nodes the tests use: the shared one, private ones that tests break, a cluster.

`TEST_BROKER_VERSION` (3.10, the default, or 4.0) picks the broker every broker-facing test
talks to. 3.10 is Debian 12's own install (scripts/rabbitmq, 127.0.0.1:5672); 4.0 is Debian 13's
RabbitMQ 4.0.5 in a chroot (scripts/rabbitmq --version 4, 127.0.0.1:5674, node
rabbit4@localhost).

A test that stops, restarts or cuts off the broker gets a private node instead: same install as
the chosen version, another node name, AMQP port and data directory. Debian's /usr/sbin wrappers
switch to the rabbitmq user and keep the environment, so `RABBITMQ_*` variables pick the node;
a 4.0 node is started through scripts/rabbitmq (which builds the chroot if needed) and driven
with the chroot's rabbitmqctl. Starting one takes about 5-10 s.

A node may get a `config` (rabbitmq.conf lines, e.g. the TLS node's listener) and files of its
own (`put_file`, e.g. certificates), in its directory: /tmp/<name>-<port> for 3.10, and for
4.0 /var/lib/rabbitmq/<name>-<port> inside the chroot, owned by the chroot's rabbitmq user, with
paths in the config as the node sees them (`node_path`).

`BrokerCluster` is three such nodes of one version made one RabbitMQ cluster: nodes 2 and 3
`join_cluster` node 1 (the rabbitmq user's one Erlang cookie lets them talk; in the chroot,
its own user's). `scripts/rabbitmq-cluster start|stop|status` drives it by hand (`python -m
tests.brokers`, 3.10 unless TEST_BROKER_VERSION or --version says 4.0).
"""

from __future__ import annotations

import argparse
import enum
import grp
import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path, PurePosixPath

_SBIN = Path("/usr/sbin")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rabbitmq"
CHROOT = Path(os.environ.get("RABBITMQ4_ROOT", "/opt/rmq4/trixie"))


class BrokerVersion(enum.StrEnum):
    V3_10 = "3.10"
    V4_0 = "4.0"


def selected_version() -> BrokerVersion:
    """The broker version the tests run against (`TEST_BROKER_VERSION`, 3.10 when unset)."""
    value = os.environ.get("TEST_BROKER_VERSION", BrokerVersion.V3_10.value)
    try:
        return BrokerVersion(value)
    except ValueError:
        raise SystemExit(f"TEST_BROKER_VERSION must be 3.10 or 4.0, not {value!r}") from None


VERSION = selected_version()
SHARED_PORT = {BrokerVersion.V3_10: 5672, BrokerVersion.V4_0: 5674}[VERSION]
SHARED_NODE_4 = "rabbit4@localhost"  # scripts/rabbitmq --version 4's default node


def rabbitmqctl(version: BrokerVersion, node: str | None) -> list[str]:
    """The command line of `rabbitmqctl [-n node]` for a node of `version` (None: the default
    node of Debian 12's install; for 4.0, the shared rabbit4@localhost)."""
    if version is BrokerVersion.V4_0:
        chroot = ["chroot", str(CHROOT), "env", "HOME=/var/lib/rabbitmq", "rabbitmqctl"]
        return [*chroot, "-n", node or SHARED_NODE_4]
    return [str(_SBIN / "rabbitmqctl"), *(["-n", node] if node else [])]


def shared_ctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`rabbitmqctl ARGS` on the shared broker of the selected version."""
    return subprocess.run(
        [*rabbitmqctl(VERSION, None), *args],
        check=check,
        capture_output=True,
        text=True,
        timeout=60,
    )


class PrivateBroker:
    """One extra RabbitMQ node of `version` on 127.0.0.1:`port`, with its own data.

    Its directory (`base` on this machine, `node_path()` as the node sees it) holds its data,
    its rabbitmq.conf when it has a `config`, and any file put there with `put_file` (TLS
    certificates, say): for 3.10 /tmp/<name>-<port>, for 4.0 /var/lib/rabbitmq/<name>-<port>
    inside the chroot, which is where scripts/rabbitmq keeps a 4.0 node's data.
    """

    def __init__(
        self,
        port: int = 5673,
        name: str = "vercel-consumer-test",
        *,
        config: str | None = None,
        version: BrokerVersion = BrokerVersion.V3_10,
    ) -> None:
        self.port = port
        self.version = version
        self.node = f"{name}-{port}@localhost"
        self._node_base = PurePosixPath(
            f"/var/lib/rabbitmq/{name}-{port}"
            if version is BrokerVersion.V4_0
            else f"/tmp/{name}-{port}"
        )
        self.base = (
            CHROOT / self._node_base.relative_to("/")
            if version is BrokerVersion.V4_0
            else Path(self._node_base)
        )
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/"
        # rabbitmq.conf lines (a TLS listener, say), written at launch; paths in them are as
        # the node sees them (`node_path`).
        self.config = config

    def node_path(self, name: str = "") -> PurePosixPath:
        """The path of `name` in the node's directory as the node sees it (what rabbitmq.conf
        names): the host path for 3.10, the path inside the chroot for 4.0."""
        return self._node_base / name if name else self._node_base

    def put_file(self, name: str, content: bytes) -> PurePosixPath:
        """Write `content` to `name` in the node's directory, readable by the node (owned by
        the rabbitmq user of the node's system); return the path the node sees."""
        self._make_base()
        path = self.base / name
        path.write_bytes(content)
        self._chown(path)
        return self.node_path(name)

    def wipe(self) -> None:
        """Delete the node's directory: its data, config and files (stop the node first)."""
        shutil.rmtree(self.base, ignore_errors=True)

    def _owner(self) -> tuple[int, int]:
        """The uid and gid of the rabbitmq user the node runs as. The chroot has its own
        /etc/passwd, whose ids need not match this machine's (they belong to other users here)."""
        if self.version is BrokerVersion.V3_10:
            return pwd.getpwnam("rabbitmq").pw_uid, grp.getgrnam("rabbitmq").gr_gid
        passwd = CHROOT / "etc" / "passwd"
        if not (CHROOT / "usr/lib/rabbitmq/bin/rabbitmq-server").exists():
            # Files go inside the chroot, so it must be built first (a few minutes, once).
            raise RuntimeError(f"no RabbitMQ 4.0 in {CHROOT} yet: run scripts/rabbitmq --version 4")
        for line in passwd.read_text().splitlines():
            fields = line.split(":")
            if fields[0] == "rabbitmq":
                return int(fields[2]), int(fields[3])
        raise RuntimeError(f"no rabbitmq user in {CHROOT}/etc/passwd")

    def _chown(self, path: Path) -> None:
        os.chown(path, *self._owner())

    def _make_base(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self._chown(self.base)

    def _write_config(self) -> None:
        if self.config:
            self.put_file("rabbitmq.conf", self.config.encode())

    def _env(self) -> dict[str, str]:
        config = {"RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf")} if self.config else {}
        return {
            **os.environ,
            **config,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 20000),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
        }

    def start(self, timeout: float = 60) -> None:
        """Start the node (a no-op when it already answers) and wait for the AMQP handshake."""
        if self.is_ready():
            return
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the node detached, without waiting for it (a clustered node waits for its
        peers at boot, so a cluster's nodes are launched together). A 4.0 node is started
        through scripts/rabbitmq, which builds the chroot if needed and waits for the node."""
        if self.version is BrokerVersion.V4_0:
            env = {**os.environ, "RABBITMQ_PORT": str(self.port), "RABBITMQ4_NODE": self.node}
            if self.config:
                self._write_config()
                env["RABBITMQ4_CONFIG"] = str(self.node_path("rabbitmq.conf"))
            subprocess.run([str(SCRIPT), "--version", "4"], env=env, check=True, timeout=900)
            return
        self._make_base()
        self._write_config()
        subprocess.run(
            [str(_SBIN / "rabbitmq-server"), "-detached"],
            env=self._env(),
            check=True,
            capture_output=True,
            cwd="/",
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.node} did not answer on port {self.port}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Shut the node down; its durable (quorum) queues keep their messages."""
        self.ctl("shutdown", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close_all_connections(self) -> None:
        self.ctl("close_all_connections", "test: closing every connection")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `rabbitmqctl -n <node> ARGS` (as the rabbitmq user, which has the cookie)."""
        return subprocess.run(
            [*rabbitmqctl(self.version, self.node), *args],
            env=self._env() if self.version is BrokerVersion.V3_10 else None,
            check=check,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def ensure_healthy(self) -> None:
        """Start the node if it is down; restart it if it lost its dead-letter supervisor.

        RabbitMQ 3.10 kills a quorum queue's at-least-once dead-letter worker when the queue
        is deleted right after it started, and after a few of those the supervisor of all such
        workers gives up for good: every later declare of a queue that dead-letters at least
        once (all of ours) fails with INTERNAL_ERROR until the node restarts. Tests that
        restart the node and then delete their queues can get it there. 4.0 has the same
        supervisor (`rabbit_fifo_dlx_sup`), so the same cheap check guards both versions.
        """
        if not self.is_ready():
            self.start()
        elif not self.dead_letter_supervisor_alive():
            self.restart()

    def dead_letter_supervisor_alive(self) -> bool:
        found = self.ctl("eval", "whereis(rabbit_fifo_dlx_sup).", check=False).stdout.strip()
        return found.startswith("<")

    def is_ready(self) -> bool:
        """Whether the node answers the AMQP 0-9-1 header with a Connection.Start frame."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                sock.settimeout(2)
                return sock.recv(1)[:1] == b"\x01"
        except OSError:
            return False


class BrokerCluster:
    """Three nodes of `version` on 127.0.0.1:`port`, `port`+1, `port`+2, clustered with the
    first."""

    def __init__(
        self,
        port: int = 5691,
        name: str = "vercel-consumer-cluster",
        version: BrokerVersion = BrokerVersion.V3_10,
    ) -> None:
        self.nodes = [PrivateBroker(port + i, name, version=version) for i in range(3)]

    def url(self, index: int) -> str:
        return self.nodes[index].url

    def urls(self, first: int = 0) -> str:
        """CONSUMER_AMQP_URL listing every node, starting with node `first`."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(node.url for node in order)

    def start(self, timeout: float = 120) -> None:
        """Up and clustered: reused when it already is, otherwise made anew from empty data."""
        if all(node.is_ready() for node in self.nodes) and self.is_clustered():
            return
        self.stop()
        for node in self.nodes:
            node.wipe()
            node.launch()
        for node in self.nodes:
            node.wait_ready(timeout)
        first = self.nodes[0].node
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first)
            node.ctl("start_app")
            node.wait_ready(timeout)
        if not self.is_clustered():
            raise RuntimeError(f"the nodes did not form one cluster: {self.running_nodes()}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def running_nodes(self) -> list[str]:
        """The cluster's running nodes, as node 1 sees them (none when node 1 is down)."""
        found = self.nodes[0].ctl("cluster_status", "--formatter", "json", check=False)
        if found.returncode != 0:
            return []
        nodes: list[str] = json.loads(found.stdout).get("running_nodes", [])
        return nodes

    def is_clustered(self) -> bool:
        return sorted(self.running_nodes()) == sorted(node.node for node in self.nodes)

    def node_of(self, address: str) -> PrivateBroker:
        """The node that listens at `host:port` (as a worker's `consuming` line names it)."""
        port = int(address.rsplit(":", 1)[1])
        return next(node for node in self.nodes if node.port == port)

    def queue_leader(self, queue: str) -> PrivateBroker:
        """The node that leads quorum queue `queue` now."""
        for node in self.nodes:
            if not node.is_ready():
                continue
            listed = node.ctl("list_queues", "name", "leader", "--quiet", check=False).stdout
            for line in listed.splitlines():
                name, _, leader = line.partition("\t")
                if name == queue:
                    return next(n for n in self.nodes if n.node == leader.strip())
        raise RuntimeError(f"no node knows the leader of {queue}")


def main() -> None:
    """`scripts/rabbitmq-cluster start|stop|status`: the test cluster, by hand."""
    parser = argparse.ArgumentParser(prog="rabbitmq-cluster")
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("CLUSTER_PORT", "5691")))
    parser.add_argument("--version", choices=[v.value for v in BrokerVersion], default=VERSION)
    args = parser.parse_args()
    cluster = BrokerCluster(args.port, version=BrokerVersion(args.version))
    if args.action == "start":
        cluster.start()
        print(f"cluster: {', '.join(n.node for n in cluster.nodes)}")
        print(f"CONSUMER_AMQP_URL={cluster.urls()}")
    elif args.action == "stop":
        cluster.stop()
    else:
        print("running:", ", ".join(cluster.running_nodes()) or "none")


if __name__ == "__main__":
    main()
