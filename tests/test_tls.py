"""amqps:// with a private CA and a client certificate (mutual TLS), on a real RabbitMQ node.

The node (ports TEST_TLS_BROKER_PORT for AMQP and +1 for AMQP over TLS, default 5681/5682) is
of the selected version (TEST_BROKER_VERSION: 3.10, or 4.0 in the chroot; the `tls_node`
fixture marks its tests `broker`, so scripts/test runs them on both). It gets certificates
made at test time by `trustme`, and demands a client certificate. The worker
and the `dlq` commands connect through it; a wrong CA, an expired certificate and a plain
port given as amqps:// each end in one sentence in the log and in /readyz's reason.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from consumer.app import build_worker
from consumer.errors import BrokerError, ConfigError
from consumer.publish.publisher import EventPublisher
from consumer.settings import load_settings
from consumer.testing.vercel_sim import VercelSimulator
from consumer.topology import connect
from consumer.vercel import VercelClient
from tests.brokers import VERSION, PrivateBroker
from tests.helpers import event, run_cli, wait_until
from tests.test_resilience import ListLog

TLS_PORT = int(os.environ.get("TEST_TLS_BROKER_PORT", "5681"))
PASSWORD = "gu3st-Pa55"  # never to be seen in a message


def _tls_node(port: int, name: str, ca: trustme.CA, server: trustme.LeafCert) -> PrivateBroker:
    node = PrivateBroker(port, name, version=VERSION)
    node.stop()
    node.wipe()
    cacert = node.put_file("ca.pem", ca.cert_pem.bytes())
    cert = node.put_file("server.pem", server.cert_chain_pems[0].bytes())
    key = node.put_file("server.key", server.private_key_pem.bytes())
    node.config = "\n".join(
        [
            f"listeners.tcp.default = {port}",
            f"listeners.ssl.default = {port + 1}",
            f"ssl_options.cacertfile = {cacert}",
            f"ssl_options.certfile = {cert}",
            f"ssl_options.keyfile = {key}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            "",
        ]
    )
    node.start()
    node.ctl("add_user", "relay", PASSWORD)
    node.ctl("set_permissions", "relay", ".*", ".*", ".*")
    return node


class Pki:
    """The private CA, a client certificate it signed, and their files."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.directory = directory
        self.cafile = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.cafile))
        client = self.ca.issue_cert("relay@example.test")
        self.certfile = directory / "client.pem"
        self.keyfile = directory / "client.key"
        client.cert_chain_pems[0].write_to_path(str(self.certfile))
        client.private_key_pem.write_to_path(str(self.keyfile))

    def settings(self, port: int, **overrides: Any) -> dict[str, Any]:
        return {
            "amqp_url": f"amqps://relay:{PASSWORD}@localhost:{port}/",
            "amqp_cafile": self.cafile,
            "amqp_certfile": self.certfile,
            "amqp_keyfile": self.keyfile,
            **overrides,
        }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_node(pki: Pki) -> Iterator[PrivateBroker]:
    node = _tls_node(TLS_PORT, "vercel-consumer-tls", pki.ca, pki.ca.issue_cert("localhost"))
    yield node
    node.stop()


async def _run_worker(
    settings_values: dict[str, Any], sim: VercelSimulator, tokens_dir: Path
) -> Any:
    settings = load_settings(
        vercel_api_url=sim.url, vercel_tokens_dir=tokens_dir, **settings_values
    )
    log = ListLog()
    vercel = VercelClient(settings.vercel_api_url)
    worker = build_worker(settings, vercel, log)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))

    async def shutdown() -> None:
        stop.set()
        await asyncio.wait_for(task, 30)
        await vercel.aclose()

    return settings, worker, log, shutdown


async def test_the_worker_and_dlq_commands_connect_with_mutual_tls(
    tls_node: PrivateBroker,
    pki: Pki,
    sim: VercelSimulator,
    tokens_dir: Path,
    names: dict[str, str],
) -> None:
    """Through the TLS port, with the private CA and a client certificate: the worker
    consumes and delivers an event published over TLS, and `dlq stats` reads the DLQ."""
    values = pki.settings(tls_node.port + 1, **names)
    settings, worker, _, shutdown = await _run_worker(values, sim, tokens_dir)
    try:
        await wait_until(lambda: worker.consuming, timeout=30)
        publisher = await EventPublisher.connect(settings.broker_urls(), exchange=names["exchange"])
        async with publisher:
            await publisher.publish(event(resource_id="res_tls"))
        await wait_until(lambda: len(sim.accepted) == 1)
    finally:
        await shutdown()
    env = {f"CONSUMER_{k.upper()}": str(v) for k, v in values.items()}
    result = await asyncio.to_thread(run_cli, "dlq", "stats", env=env)
    assert result.returncode == 0, result.stderr
    assert "0 dead letters" in result.stdout


def _expect_sentence(readiness: tuple[bool, dict[str, Any]], log: ListLog, fragment: str) -> None:
    ready, detail = readiness
    assert not ready
    assert detail["cause"] == "tls"  # what /readyz tells the pod network: the kind, no host
    reason = str(detail.get("detail"))
    assert fragment in reason
    assert PASSWORD not in reason
    assert "Traceback" not in reason
    [(_, fields)] = [line for line in log.lines if line[0] == "broker unavailable"]
    assert fragment in fields["error"]
    assert PASSWORD not in repr(log.lines)


async def _first_failure(values: dict[str, Any], sim: VercelSimulator, tokens_dir: Path) -> Any:
    _, worker, log, shutdown = await _run_worker(values, sim, tokens_dir)
    try:
        await wait_until(lambda: worker.readiness()[1].get("detail") is not None, timeout=30)
        return worker.readiness(), log
    finally:
        await shutdown()


async def test_a_wrong_ca_is_one_sentence(
    tls_node: PrivateBroker, pki: Pki, sim: VercelSimulator, tokens_dir: Path, tmp_path: Path
) -> None:
    """A CA file that did not sign the broker's certificate: 'not accepted', in the log and
    in the readiness reason; no traceback, no password."""
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    values = pki.settings(tls_node.port + 1, amqp_cafile=other)
    readiness, log = await _first_failure(values, sim, tokens_dir)
    _expect_sentence(readiness, log, "TLS: the broker's certificate was not accepted")


async def test_a_plain_port_given_as_amqps_is_one_sentence(
    tls_node: PrivateBroker, pki: Pki, sim: VercelSimulator, tokens_dir: Path
) -> None:
    """amqps:// to the plain AMQP port: 'did not answer with TLS'."""
    values = pki.settings(tls_node.port)
    readiness, log = await _first_failure(values, sim, tokens_dir)
    _expect_sentence(readiness, log, "TLS: the broker did not answer with TLS")


async def test_an_expired_broker_certificate_is_one_sentence(
    tls_node: PrivateBroker, pki: Pki
) -> None:
    """A node whose certificate expired yesterday: 'not accepted (certificate has expired)',
    from connect (which the dlq commands and the publisher use too)."""
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    expired = pki.ca.issue_cert(
        "localhost", not_before=yesterday - datetime.timedelta(days=30), not_after=yesterday
    )
    node = await asyncio.to_thread(
        _tls_node, TLS_PORT + 2, "vercel-consumer-tls-exp", pki.ca, expired
    )
    try:
        settings = load_settings(**pki.settings(node.port + 1))
        with pytest.raises(BrokerError) as caught:
            await connect(settings.broker_urls())
    finally:
        await asyncio.to_thread(node.stop)
    message = str(caught.value)
    assert "TLS: the broker's certificate was not accepted (certificate has expired)" in message
    assert PASSWORD not in message


def _pem_files(directory: Path) -> dict[str, Path]:
    ca = trustme.CA()
    client = ca.issue_cert("relay@example.test")
    other = trustme.CA().issue_cert("other@example.test")
    files = {
        "ca": ca.cert_pem,
        "cert": client.cert_chain_pems[0],
        "key": client.private_key_pem,
        "other_key": other.private_key_pem,
    }
    for name, pem in files.items():
        pem.write_to_path(str(directory / name))
    (directory / "garbage").write_text("not a certificate\n")
    return {name: directory / name for name in [*files, "garbage"]}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"amqp_cafile": "garbage"}, "CONSUMER_AMQP_CAFILE="),
        ({"amqp_cafile": "missing"}, "is not a readable file"),
        ({"amqp_certfile": "cert", "amqp_keyfile": "other_key"}, "not a PEM certificate"),
        ({"amqp_certfile": "cert"}, "not a PEM certificate"),  # the key is not in it
        ({"amqp_keyfile": "key"}, "without CONSUMER_AMQP_CERTFILE"),
    ],
)
def test_unusable_tls_files_stop_the_start_in_one_sentence(
    tmp_path: Path, values: dict[str, str], expected: str
) -> None:
    """A CA file that is no CA, a certificate whose key does not match, a key without its
    certificate: refused at start-up, naming the variable."""
    files = _pem_files(tmp_path)
    given = {name: files.get(value, tmp_path / value) for name, value in values.items()}
    with pytest.raises(ConfigError) as caught:
        load_settings(amqp_url=f"amqps://relay:{PASSWORD}@localhost/", **given)
    assert expected in str(caught.value)
    assert "CONSUMER_AMQP_" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_a_matching_client_certificate_and_key_are_accepted(tmp_path: Path) -> None:
    files = _pem_files(tmp_path)
    settings = load_settings(
        amqp_url="amqps://a/,amqp://b/",
        amqp_cafile=files["ca"],
        amqp_certfile=files["cert"],
        amqp_keyfile=files["key"],
    )
    assert settings.broker_urls() == (
        f"amqps://a/?cafile={files['ca']}&certfile={files['cert']}&keyfile={files['key']},amqp://b/"
    )


def test_an_encrypted_key_is_refused_without_prompting(tmp_path: Path) -> None:
    """OpenSSL would ask for an encrypted key's password on the terminal; the settings refuse
    it with a sentence instead."""
    files = _pem_files(tmp_path)
    key = serialization.load_pem_private_key(files["key"].read_bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"k3y-pass"),
    )
    (tmp_path / "encrypted").write_bytes(encrypted)
    with pytest.raises(ConfigError, match="is encrypted"):
        load_settings(amqp_certfile=files["cert"], amqp_keyfile=tmp_path / "encrypted")
