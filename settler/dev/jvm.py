"""The JVM both servers run on: a Java 17 or newer (from $JAVA_HOME, else PATH), and each
service's options from its checked-in `deploy/local/<service>/jvm.options` (heap sizes
small enough for a laptop).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from settler.dev.paths import deploy_dir
from settler.dev.services import DevStackError


def java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    found = str(candidate) if candidate and candidate.is_file() else shutil.which("java")
    if found is None:
        raise DevStackError("java is not on PATH: the dev stack needs Java 17")
    result = subprocess.run(
        [found, "-version"], capture_output=True, text=True, check=False, timeout=60
    )
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr)
    if match is None:
        raise DevStackError(f"cannot tell the Java version of {found}")
    major = int(match.group(1))
    if major == 1 and match.group(2):
        major = int(match.group(2))  # "1.8.0_x" is Java 8
    if major < 17:
        raise DevStackError(f"{found} is Java {major}: the dev stack needs Java 17 or newer")
    return found


def jvm_options(service: str) -> list[str]:
    options: list[str] = []
    for line in (deploy_dir() / service / "jvm.options").read_text().splitlines():
        option = line.strip()
        if option and not option.startswith("#"):
            options.append(option)
    return options
