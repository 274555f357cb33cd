"""The AsyncAPI document: generated from the code, committed up to date, valid for the
official AsyncAPI parser (tools/asyncapi-validate, installed by scripts/node-tools)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from consumer.asyncapi import document, to_yaml
from consumer.contract import json_schema
from consumer.errors import Reason
from consumer.topology import Topology
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "docs" / "asyncapi.yaml"
VALIDATOR = REPO / "tools" / "asyncapi-validate"
DEFAULT = Topology(exchange="domain-events", queue="vercel-events", retry_tiers_ms=())


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    assert (VALIDATOR / "node_modules").is_dir(), "run scripts/node-tools first"
    return subprocess.run(
        ["node", str(VALIDATOR / "validate.mjs"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_committed_document_is_what_the_code_generates() -> None:
    """docs/asyncapi.yaml equals `vercel-consumer asyncapi`'s output: regenerate it with
    `vercel-consumer asyncapi > docs/asyncapi.yaml` when this fails."""
    result = run_cli("asyncapi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == COMMITTED.read_text(), "docs/asyncapi.yaml is stale"


def test_the_document_carries_the_codes_contract() -> None:
    """The YAML reads back to the generated document, with the exchange, the JSON Schema's
    fields, the traceparent and CloudEvents headers and the dead-letter reasons in it."""
    parsed = yaml.safe_load(to_yaml(document(DEFAULT)))
    assert parsed == document(DEFAULT)
    exchange = parsed["channels"]["resourceEvents"]["bindings"]["amqp"]["exchange"]
    assert exchange["name"] == "domain-events"
    messages = parsed["components"]["messages"]
    assert "traceparent" in messages["domainEvent"]["headers"]["properties"]
    assert "ce-specversion" in messages["cloudEventBinary"]["headers"]["required"]
    reasons = messages["deadLetter"]["headers"]["properties"]["dead-letter-reason"]["enum"]
    assert reasons == [reason.value for reason in Reason]
    assert parsed["channels"]["retryTiers"]["address"] == "vercel-events.retry.{delayMs}ms"
    schemas = parsed["components"]["schemas"]
    assert schemas["ResourceEvent"] == json_schema()["$defs"]["ResourceEvent"]


def test_the_official_parser_accepts_the_committed_document() -> None:
    """@asyncapi/parser finds no error in docs/asyncapi.yaml."""
    result = validate(COMMITTED)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid AsyncAPI 3.0.0" in result.stdout


def test_the_validator_rejects_a_broken_document(tmp_path: Path) -> None:
    """The check can fail: a reference to a missing message makes the parser report an error."""
    broken = document(DEFAULT)
    broken["channels"]["workQueue"]["messages"]["ghost"] = {"$ref": "#/components/messages/x"}
    path = tmp_path / "broken.yaml"
    path.write_text(to_yaml(broken))
    result = validate(path)
    assert result.returncode == 1, result.stdout
    assert "INVALID" in result.stdout
