"""The container image: a clean Dockerfile, a complete lock, and an image that runs as it must.

The Dockerfile is linted with hadolint and the lock checked against pyproject.toml everywhere.
The image itself is built with buildah (scripts/image: chroot isolation, vfs storage, a Debian
bookworm + python3 base made with debootstrap, since no registry is reachable) and then run the
way Kubernetes runs it: as the image's non-root user, on a read-only root filesystem with a
tmpfs on /tmp, against the real broker. Building needs root, buildah and debootstrap
(scripts/test installs the last two): without them these tests skip on a developer's machine
with the reason, and fail in CI (CI=true), which must run them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aio_pika.abc import AbstractConnection
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from consumer.retry import RetryPolicy
from consumer.topology import Topology
from tests.helpers import AMQP_URL, delete_topology, get_json, scrape, wait_until

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("IMAGE_CACHE", "/var/cache/vercel-event-consumer"))
HADOLINT = Path(sys.executable).with_name("hadolint")


# ── everywhere: lint and lock ────────────────────────────────────────────────────────────────


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dockerfile_is_hadolint_clean(tmp_path: Path) -> None:
    """hadolint finds nothing in the Dockerfile, and does find faults in a bad one."""
    result = hadolint(ROOT / "Dockerfile")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python -m consumer run\n")
    findings = hadolint(bad).stdout
    assert "DL3007" in findings  # latest tag
    assert "DL3013" in findings  # unpinned pip install
    assert "DL3025" in findings  # shell-form CMD


def locked_versions() -> dict[str, tuple[str, int]]:
    """requirements.lock as name → (pinned version, number of hashes)."""
    text = (ROOT / "requirements.lock").read_text()
    pinned = r"^([A-Za-z0-9_.-]+)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})*)"
    entries = re.findall(pinned, text, re.M)
    return {
        canonicalize_name(name): (version, hashes.count("--hash="))
        for name, version, hashes in entries
    }


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    """Each dependency in pyproject.toml, of the extras the image carries (the outbox relay,
    tracing) and the build backend is pinned, in range, hashed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    locked = locked_versions()
    extras = project["project"]["optional-dependencies"]
    wanted = project["project"]["dependencies"] + project["build-system"]["requires"]
    wanted += extras["outbox"] + extras["otel"]
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in requirements.lock: run scripts/lock"
        version, hashes = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), (name, version)
        assert hashes >= 1, f"{name} has no hash"
    assert all(hashes >= 1 for _, hashes in locked.values())


# ── where buildah can run: the image ─────────────────────────────────────────────────────────


def missing_image_tools() -> list[str]:
    missing = [tool for tool in ("buildah", "debootstrap", "unshare", "chroot") if not which(tool)]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def buildah(*args: str, timeout: float = 120) -> str:
    command = [
        which("buildah") or "buildah",
        *("--root", str(CACHE / "containers" / "storage")),
        *("--runroot", str(CACHE / "containers" / "run")),
        *("--storage-driver", "vfs"),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"buildah {' '.join(args)}: {result.stderr}"
    return result.stdout


@dataclass
class Image:
    """A built image, with a working container of it mounted at `root` for inspection."""

    name: str
    config: dict[str, Any]
    container: str
    root: Path


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> Iterator[Image]:
    missing = missing_image_tools()
    if missing:
        reason = f"the image tests need {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run them (scripts/test installs buildah, debootstrap)")
        pytest.skip(f"{reason}: run scripts/test as root to install the tools and run them")
    name = f"localhost/vercel-event-consumer:test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    build = subprocess.run(
        [str(ROOT / "scripts" / "image")],
        env={**os.environ, "IMAGE": name, "IMAGE_CACHE": str(CACHE)},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    seconds = time.monotonic() - started
    inspected = json.loads(buildah("inspect", "--type", "image", name))
    container = buildah("from", "--pull=never", "--quiet", name).strip()
    root = Path(buildah("mount", container).strip())
    size = buildah("images", "--format", "{{.Size}}", name).strip()
    # A number to watch, not to assert on: printed past pytest's capture.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nimage: scripts/image took {seconds:.0f} s; the image is {size}")
    yield Image(name, inspected["OCIv1"]["config"], container, root)
    buildah("umount", container)
    buildah("rm", container)
    buildah("rmi", name)


def test_image_runs_vercel_consumer_as_its_entrypoint(image: Image) -> None:
    """`vercel-consumer --help` runs in the image; entrypoint, command and user are as designed."""
    output = buildah(
        "run", "--isolation", "chroot", image.container, "--", "vercel-consumer", "--help"
    )
    assert output.startswith("usage: vercel-consumer")
    assert image.config["Entrypoint"] == ["vercel-consumer"]
    assert image.config["Cmd"] == ["run"]
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", image.config["User"]), "numeric, non-root"


def test_image_holds_no_build_tools_caches_or_sources(image: Image) -> None:
    """The runtime stage has the virtualenv only: no pip, setuptools, compilers, caches or /src."""
    venv = image.root / "opt" / "venv"
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert (site / "consumer" / "cli.py").is_file()
    assert not list(site.glob("pip*"))
    assert not list(site.glob("setuptools*"))
    assert not (venv / "bin" / "pip").exists()
    leftovers = ["src", "root/.cache", "tmp/pip-ephem-wheel-cache", "usr/bin/gcc", "usr/bin/cc"]
    assert [path for path in leftovers if (image.root / path).exists()] == []
    assert list((image.root / "tmp").iterdir()) == []


def test_image_code_is_read_only_to_the_worker(image: Image) -> None:
    """Everything in the virtualenv belongs to root and no one else may write it."""
    for path in (image.root / "opt" / "venv").rglob("*"):
        if path.is_symlink():
            continue
        info = path.lstat()
        assert info.st_uid == 0, path
        assert not info.st_mode & 0o022, f"{path} is writable by group or others"


def run_as_kubernetes_would(
    image: Image, command: list[str], env: dict[str, str], output: Path
) -> subprocess.Popen[bytes]:
    """Run `command` in the image as its user, on a read-only root with a tmpfs on /tmp."""
    root = str(image.root)
    script = (
        'set -e; root="$1"; user="$2"; shift 2; '
        'mount --bind "$root" "$root"; mount -o remount,bind,ro "$root"; '
        'mount -t tmpfs -o size=16m tmpfs "$root/tmp"; mount -t proc proc "$root/proc"; '
        'mount --rbind /dev "$root/dev"; '
        'exec chroot --userspec="$user" "$root" "$@"'
    )
    image_env = dict(item.split("=", 1) for item in image.config.get("Env", []))
    with output.open("wb") as sink:
        return subprocess.Popen(
            [which("unshare") or "unshare", "--mount", "--propagation", "private",
             "sh", "-c", script, "run", root, image.config["User"], *command],
            env={**image_env, **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def test_the_run_harness_really_makes_the_root_read_only(image: Image, tmp_path: Path) -> None:
    """The harness below is not vacuous: /opt cannot be written, /tmp can."""
    probe = (
        "import pathlib; pathlib.Path('/tmp/ok').write_text('x'); print('tmp writable'); "
        "pathlib.Path('/opt/venv/x').write_text('x')"
    )
    log = tmp_path / "probe.log"
    process = run_as_kubernetes_would(image, ["python3", "-c", probe], {}, log)
    assert process.wait(timeout=60) != 0
    assert "tmp writable" in log.read_text()
    assert "Read-only file system" in log.read_text()


async def test_worker_runs_on_a_read_only_root_as_its_non_root_user(
    image: Image, names: dict[str, str], amqp: AbstractConnection, tmp_path: Path, free_port: int
) -> None:
    """The image's entrypoint and command consume and answer the probes, on a read-only root."""
    log = tmp_path / "worker.log"
    env = {
        "CONSUMER_AMQP_URL": AMQP_URL,
        "CONSUMER_EXCHANGE": names["exchange"],
        "CONSUMER_QUEUE": names["queue"],
        "CONSUMER_RETRY_DELAYS": "1",
        "CONSUMER_VERCEL_TOKEN": "tok_image_test",
        "CONSUMER_HEALTH_PORT": str(free_port),
    }
    command = image.config["Entrypoint"] + image.config["Cmd"]
    worker = run_as_kubernetes_would(image, command, env, log)
    try:
        await wait_until(lambda: b'"consuming"' in log.read_bytes() or worker.poll() is not None)
        assert worker.poll() is None, log.read_text()
        assert process_uid(worker.pid) == image.config["User"].split(":")[0]
        health = f"http://127.0.0.1:{free_port}"
        await wait_until(lambda: readyz_is(health, 200))
        assert await get_json(f"{health}/livez") == (200, {"alive": True})
        assert any(name.startswith("vercel_consumer_") for name, _ in await scrape(health))
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        topology = Topology(names["exchange"], names["queue"], RetryPolicy((1,), 1).tiers_ms)
        await delete_topology(amqp, names, [topology])
    assert "Read-only file system" not in log.read_text()


def process_uid(pid: int) -> str:
    """The real user id a running process has (from /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^Uid:\s+(\d+)", status, re.M)
    assert found is not None
    return found.group(1)


async def readyz_is(base_url: str, status: int) -> bool:
    try:
        return (await get_json(f"{base_url}/readyz"))[0] == status
    except aiohttp.ClientConnectionError:  # not listening yet
        return False
