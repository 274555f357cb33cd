"""A private RabbitMQ node for tests that stop, restart or cut off the broker.

The shared broker on 5672 (scripts/rabbitmq) serves every other test, so a test that breaks the
broker on purpose gets its own node instead: same Debian install, another node name, AMQP port
and data directory. Debian's /usr/sbin wrappers switch to the rabbitmq user and keep the
environment, so `RABBITMQ_*` variables pick the node. Starting one takes about 5 s.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

_SBIN = Path("/usr/sbin")


class PrivateBroker:
    """One extra RabbitMQ node on 127.0.0.1:`port`, with its own data under /tmp."""

    def __init__(self, port: int = 5673, name: str = "vercel-consumer-test") -> None:
        self.port = port
        self.node = f"{name}-{port}@localhost"
        self.base = Path(f"/tmp/{name}-{port}")
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
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
        self.base.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.base, "rabbitmq", "rabbitmq")
        subprocess.run(
            [str(_SBIN / "rabbitmq-server"), "-detached"],
            env=self._env(),
            check=True,
            capture_output=True,
            cwd="/",
        )
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
