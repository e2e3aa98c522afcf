"""The jars: Maven resolves Kafka's and Cassandra's classpaths from `deploy/local/pom.xml`
once (into ~/.m2), and again only when a pom changes; the classpath files under
`.stack/classpath/` also tell which server version a JVM runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from settler.dev.paths import LOG_TAIL_LINES, classpath_path, deploy_dir, stack_dir
from settler.dev.processes import cmdline
from settler.dev.services import JARS_OF, SERVICES, DevStackError

_VERSION_JAR = {
    "kafka": re.compile(r"^kafka_[0-9.]+-(?P<version>[^/]+)\.jar$"),
    "cassandra": re.compile(r"^cassandra-all-(?P<version>[^/]+)\.jar$"),
}


def _poms() -> list[Path]:
    base = deploy_dir()
    return [base / "pom.xml", *(base / service / "pom.xml" for service in SERVICES)]


def _poms_digest() -> str:
    digest = hashlib.sha256()
    for pom in _poms():
        digest.update(pom.read_bytes())
    return digest.hexdigest()


def _read_classpath(service: str) -> list[Path] | None:
    """The classpath file's jars, or None when it is missing or names a missing jar."""
    try:
        text = classpath_path(service).read_text().strip()
    except OSError:
        return None
    jars = [Path(entry) for entry in text.split(os.pathsep) if entry]
    if not jars or not all(jar.is_file() for jar in jars):
        return None
    return jars


def resolve_classpaths(*, quiet: bool = False) -> dict[str, list[Path]]:
    """Each service's jars; runs Maven only when the classpath files are missing or stale."""
    digest_file = stack_dir() / "classpath" / "poms.sha256"
    digest = _poms_digest()
    current = {service: _read_classpath(service) for service in SERVICES}
    fresh = digest_file.exists() and digest_file.read_text().strip() == digest
    if fresh and all(jars is not None for jars in current.values()):
        return {service: jars for service, jars in current.items() if jars is not None}

    mvn = shutil.which("mvn")
    if mvn is None:
        raise DevStackError("Maven (mvn) is not on PATH: install Java 17 and Maven first")
    if not quiet:
        _say("resolving Kafka and Cassandra jars from Maven Central (first run only)...")
    (stack_dir() / "classpath").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-Dstyle.color=never",
            "-f",
            str(deploy_dir() / "pom.xml"),
            "dependency:build-classpath",
            f"-Dstack.dir={stack_dir()}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join(f"  | {line}" for line in result.stdout.splitlines()[-LOG_TAIL_LINES:])
        raise DevStackError(f"resolving jars with Maven failed (exit {result.returncode})\n{tail}")
    resolved: dict[str, list[Path]] = {}
    for service in SERVICES:
        jars = _read_classpath(service)
        if jars is None:
            raise DevStackError(f"Maven wrote no usable classpath for {service}")
        resolved[service] = jars
    digest_file.write_text(digest + "\n")
    if not quiet:
        _say(f"resolved {sum(map(len, resolved.values()))} jars in "
             f"{time.monotonic() - started:.1f}s")
    return resolved


def _say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


def _jar_version(service: str, jars: list[Path] | None) -> str | None:
    for jar in jars or []:
        match = _VERSION_JAR[service].match(jar.name)
        if match:
            return match.group("version")
    return None


def running_jar_version(service: str, pid: int | None) -> str | None:
    """The version of the jar the running JVM was started with, else the resolved one."""
    service = JARS_OF[service]
    if pid is not None:
        argv = cmdline(pid)
        if "-cp" in argv and argv.index("-cp") + 1 < len(argv):
            entries = argv[argv.index("-cp") + 1].split(os.pathsep)
            version = _jar_version(service, [Path(entry) for entry in entries])
            if version:
                return version
    try:
        entries = classpath_path(service).read_text().strip().split(os.pathsep)
    except OSError:
        return None
    return _jar_version(service, [Path(entry) for entry in entries if entry])
