"""The package's import graph: pure modules stay pure, and imports point down the layers only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "consumer"

# Lower number = lower layer. A module may import its own layer or lower ones, never higher.
LAYERS = {
    "errors": 0,
    "headers": 0,
    "settings": 1,
    "logs": 1,
    "dlq.progress": 1,
    "contract": 2,
    "outbox.schema": 2,
    "translate": 2,
    "cloudevents": 2,
    "asyncapi": 4,
    "retry": 2,
    "tracing": 2,
    "breaker": 2,
    "ratelimit": 2,
    "dlq.export": 2,
    "ackrun": 2,
    "coalesce": 2,
    "amqpurl": 0,
    "backoff": 0,
    "accepted": 0,
    "tokens": 3,
    "vercel": 3,
    "topology": 3,
    "deadletter": 3,
    "publish.publisher": 3,
    "testing.vercel_sim": 3,
    "metrics": 3,
    "otel": 3,
    "otel_sdk": 3,
    "outbox.write": 3,
    "outbox.store": 3,
    "outbox.metrics": 3,
    "depths": 3,
    "acking": 3,
    "coalescing": 3,
    "health": 3,
    "dlq.model": 3,
    "dlq.session": 3,
    "handler": 4,
    "worker": 4,
    "outbox.relay": 4,
    "dlq.replay": 4,
    "dlq.purge": 4,
    "dlq.restore": 4,
    "dlq.render": 5,
    "app": 5,
    "cli": 6,
    "dlq.cli": 6,
    "outbox.cli": 6,
    "__main__": 7,
}
PURE = (
    "headers",
    "amqpurl",
    "backoff",
    "accepted",
    "contract",
    "cloudevents",
    "translate",
    "retry",
    "tracing",
    "breaker",
    "ratelimit",
    "dlq.export",
    "ackrun",
    "coalesce",
    "outbox.schema",
)
THIRD_PARTY_IO = ("aio_pika", "aiormq", "pamqp", "httpx", "aiohttp")


def imports_of(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module.replace('.', '/')}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in a layer here before it can be imported."""
    modules = {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for path in PACKAGE.rglob("*.py")
        if path.stem != "__init__"
    }
    assert modules == set(LAYERS)


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_no_io(module: str) -> None:
    """The pure modules (PURE) import neither the AMQP nor any HTTP library."""
    roots = {name.split(".")[0] for name in imports_of(module)}
    assert not roots & set(THIRD_PARTY_IO)


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_point_down(module: str) -> None:
    """No module imports one from a higher layer (entry points → orchestration → adapters → pure
    → leaves)."""
    own = [
        name.removeprefix("consumer.")
        for name in imports_of(module)
        if name.startswith("consumer.")
    ]
    upward = [name for name in own if LAYERS[name] > LAYERS[module]]
    assert upward == []


def test_only_the_cli_reads_settings() -> None:
    """Settings are read once, by the entry points (cli, app and the dlq commands, dlq.cli);
    other modules receive plain values."""
    readers = {module for module in LAYERS if "consumer.settings" in imports_of(module)}
    assert readers == {"app", "cli", "dlq.cli", "outbox.cli"}


def test_only_the_cli_reaches_the_outbox() -> None:
    """The worker and the rest of the package never import the outbox (and so never need its
    PostgreSQL driver); the command line reaches it through its own entry point only."""
    importers = {
        module
        for module in LAYERS
        if not module.startswith("outbox.")
        and any(name.startswith("consumer.outbox") for name in imports_of(module))
    }
    assert importers == {"cli"}
