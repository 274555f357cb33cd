"""Broker URLs: a comma-separated failover list, each URL checked, TLS files merged in.

`CONSUMER_AMQP_URL` may name several brokers (`amqp://u:p@node1/,amqp://u:p@node2/`), as
kombu's failover URLs do: the nodes of one cluster, tried in turn. The list is split only at a
comma followed by another `scheme://`, so a comma inside a password does not split it. Nothing
here ever formats a URL into a message: problems name the URL by its position.

TLS: aiormq reads `cafile`, `capath`, `certfile`, `keyfile` and `no_verify_ssl` from an
`amqps://` URL's query. `with_tls` adds the files given as `CONSUMER_AMQP_CAFILE`,
`CONSUMER_AMQP_CERTFILE` and `CONSUMER_AMQP_KEYFILE` to every `amqps://` URL of the list that
does not already name its own, so one setting covers every node (and a Helm-mounted Secret
needs no path inside the URL Secret).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

SCHEMES = ("amqp", "amqps")
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
# A comma that starts another URL (any scheme, so that a mistyped one is reported, not read as
# part of the previous URL's path).
_SEPARATOR = re.compile(r"\s*,\s*(?=[a-z][a-z0-9+.-]*://)", re.IGNORECASE)


def split_urls(value: str) -> tuple[str, ...]:
    """The URLs of a comma-separated list (one URL is a list of one), blanks dropped."""
    return tuple(part for part in (p.strip() for p in _SEPARATOR.split(value.strip())) if part)


def url_problem(url: str) -> str | None:
    """Why `url` is not a usable broker URL, in words that do not repeat it; None when fine."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL (percent-encode reserved characters in the password)"
    if parts.scheme.lower() not in SCHEMES or not parts.hostname:
        return "must be an amqp:// or amqps:// URL with a host"
    if port == 0:
        return "has port 0"
    return None


def list_problem(value: str) -> str | None:
    """Why the list `value` is unusable (naming the bad URL by its position); None when fine."""
    urls = split_urls(value)
    if not urls:
        return "give at least one amqp:// or amqps:// URL"
    for position, url in enumerate(urls, start=1):
        problem = url_problem(url)
        if problem is not None:
            where = f"URL {position} of {len(urls)}" if len(urls) > 1 else "the URL"
            return f"{where} {problem}"
    return None


def broker_address(url: str) -> str:
    """`host:port` of each URL of the list: which brokers, without the credentials."""
    addresses = []
    for one in split_urls(url):
        parts = urlsplit(one)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower(), 5672)
        addresses.append(f"{parts.hostname}:{port}")
    return ", ".join(addresses)


def with_query(url: str, params: Mapping[str, str]) -> str:
    """`url` with each of `params` added to its query, unless the query already sets it."""
    parts = urlsplit(url)
    present = {key for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
    added = [f"{key}={quote(val, safe='/')}" for key, val in params.items() if key not in present]
    if not added:
        return url
    query = "&".join([parts.query, *added] if parts.query else added)
    return urlunsplit(parts._replace(query=query))


def with_tls(value: str, files: Mapping[str, str]) -> str:
    """The list `value` with the TLS `files` (aiormq's query names: cafile, certfile, keyfile)
    added to each of its amqps:// URLs."""
    if not files:
        return value
    return ",".join(
        with_query(url, files) if urlsplit(url).scheme.lower() == "amqps" else url
        for url in split_urls(value)
    )
