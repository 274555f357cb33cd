"""The public API is what `consumer.__all__` says, no more and no less (as httpx pins its own):
a name added to or dropped from it is a decision, made here on purpose."""

from __future__ import annotations

import subprocess
import sys

import consumer
import consumer.testing

PUBLIC = {
    "BillingEvent",
    "BrokerError",
    "ConfigError",
    "ConsumerError",
    "ContractError",
    "Event",
    "EventPublisher",
    "PublishBatchError",
    "PublishError",
    "PublishNotConfirmed",
    "PublishTimeout",
    "PublishUnroutable",
    "ResourceEvent",
    "__version__",
    "example_event",
    "json_schema",
    "parse_event",
}


def test_the_public_names_are_pinned() -> None:
    """`consumer.__all__` is exactly the pinned set, and every name in it exists."""
    assert set(consumer.__all__) == PUBLIC
    assert all(hasattr(consumer, name) for name in consumer.__all__)


def test_public_callables_and_classes_say_they_are_ours() -> None:
    """Each public class and function is defined in this package (not re-exported from a
    third party), so its documentation and typing are ours to keep."""
    for name in PUBLIC - {"__version__", "Event"}:
        assert getattr(consumer, name).__module__.startswith("consumer."), name


def test_publish_errors_are_broker_errors() -> None:
    """A partner catching BrokerError (or ConsumerError) catches every failed publish."""
    for name in ("PublishError", "PublishUnroutable", "PublishNotConfirmed", "PublishTimeout"):
        assert issubclass(getattr(consumer, name), consumer.BrokerError)
    assert issubclass(consumer.BrokerError, consumer.ConsumerError)


def test_the_test_double_is_public() -> None:
    """`consumer.testing` exports the Vercel simulator for partners' own tests."""
    assert set(consumer.testing.__all__) == {"Accepted", "Fault", "Refused", "VercelSimulator"}


def test_the_version_is_a_string_whatever_was_imported_first() -> None:
    """`consumer.__version__` stays the version string after the CLI's whole import graph is
    loaded (a submodule named like the attribute once replaced it with a module)."""
    script = "import consumer.cli, consumer; print(type(consumer.__version__).__name__)"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "str"
