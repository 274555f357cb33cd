"""A private RabbitMQ node for tests that stop, restart or cut off the broker.

The shared broker on 5672 (scripts/rabbitmq) serves every other test, so a test that breaks the
broker on purpose gets its own node instead: same Debian install, another node name, AMQP port
and data directory. Debian's /usr/sbin wrappers switch to the rabbitmq user and keep the
environment, so `RABBITMQ_*` variables pick the node. Starting one takes about 5 s.

`BrokerCluster` is three such nodes made one RabbitMQ cluster: nodes 2 and 3 `join_cluster`
node 1 (the rabbitmq user's one Erlang cookie lets them talk). `scripts/rabbitmq-cluster
start|stop|status` drives it by hand (`python -m tests.brokers`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

_SBIN = Path("/usr/sbin")


class PrivateBroker:
    """One extra RabbitMQ node on 127.0.0.1:`port`, with its own data under /tmp."""

    def __init__(
        self, port: int = 5673, name: str = "vercel-consumer-test", config: str | None = None
    ) -> None:
        self.port = port
        self.node = f"{name}-{port}@localhost"
        self.base = Path(f"/tmp/{name}-{port}")
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/"
        self.config = config  # rabbitmq.conf lines (a TLS listener, say), written at launch

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
        peers at boot, so a cluster's nodes are launched together)."""
        self.base.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.base, "rabbitmq", "rabbitmq")
        if self.config:
            (self.base / "rabbitmq.conf").write_text(self.config)
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
            [str(_SBIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self._env(),
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
        restart the node and then delete their queues can get it there.
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
    """Three nodes on 127.0.0.1:`port`, `port`+1, `port`+2, clustered with the first."""

    def __init__(self, port: int = 5691, name: str = "vercel-consumer-cluster") -> None:
        self.nodes = [PrivateBroker(port + i, name) for i in range(3)]

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
            shutil.rmtree(node.base, ignore_errors=True)
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
        """The cluster's running nodes, as node 1 sees them."""
        found = self.nodes[0].ctl("eval", "rabbit_nodes:all_running().", check=False)
        return re.findall(r"'?([\w.-]+@[\w.-]+)'?", found.stdout)

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
    args = parser.parse_args()
    cluster = BrokerCluster(args.port)
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
