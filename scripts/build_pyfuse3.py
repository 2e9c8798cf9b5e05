"""Install pyfuse3 with envfs's patches into the running Python environment.

pyfuse3 3.5.0 lacks three things envfs needs, which cannot be added from Python: a
fallocate handler, a faster request loop for a single worker, and create modes left
unmasked with POSIX ACLs. The patches that add them, each with its reasons, are in
``scripts/pyfuse3/`` (see the README there).

Steps: download the pinned source release with pip and check its SHA-256; extract it; for
each patch in name order, check that it applies exactly (``patch --dry-run``, no fuzz),
then apply it; build and install the tree as version ``3.5.0+envfs5``, which satisfies
envfs's requirement on pyfuse3, so installing envfs afterwards keeps it. Inside a
virtualenv the checked release is kept as ``share/envfs/pyfuse3-3.5.0.tar.gz`` for the
tests.

Run by ``make setup`` before envfs is installed; does nothing if the running environment
already has this build. Needs what building stock pyfuse3 needs (gcc, python3-dev,
libfuse3-dev, pkg-config), ``patch``, and access to PyPI.

Usage: python scripts/build_pyfuse3.py [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.5.0"
LOCAL_VERSION = f"{VERSION}+envfs5"
SDIST = f"pyfuse3-{VERSION}.tar.gz"
SDIST_SHA256 = "88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24"
PATCH_DIR = Path(__file__).resolve().parent / "pyfuse3"


class BuildError(Exception):
    """A step failed; the message says which."""


def installed_has_handler() -> bool:
    """Whether the running environment's pyfuse3 is this build (so nothing is to do)."""
    probe = (
        "import importlib.metadata as m, pyfuse3, sys\n"
        f"ok = m.version('pyfuse3') == {LOCAL_VERSION!r}"
        " and getattr(pyfuse3, '_envfs_fallocate', 0) >= 2"
        " and getattr(pyfuse3, '_envfs_fast_path', 0) >= 2"
        " and callable(getattr(pyfuse3, '_envfs_set_busy_poll', None))"
        " and getattr(pyfuse3, '_envfs_acl', 0) >= 1\n"
        "sys.exit(0 if ok else 1)"
    )
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def patches() -> list[Path]:
    """The patch files, in the order they are applied."""
    found = sorted(PATCH_DIR.glob("*.patch"))
    if not found:
        raise BuildError(f"no patches in {PATCH_DIR}")
    return found


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], env=env, check=False)
    if result.returncode != 0:
        raise BuildError(f"pip {' '.join(args)} exited {result.returncode}")


def download(dest: Path) -> Path:
    pip(
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--dest",
        str(dest),
        f"pyfuse3=={VERSION}",
    )
    archive = dest / SDIST
    check_sdist(archive)
    return archive


def check_sdist(archive: Path) -> None:
    """Raises BuildError unless ``archive`` is the pinned release."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise BuildError(f"{SDIST}: SHA-256 {digest}, expected {SDIST_SHA256}")


def extract(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later
            tar.extractall(dest, filter="data")
        else:  # Debian 12's 3.11.2: the same refusals, made by hand
            for member in tar.getmembers():
                target = (dest / member.name).resolve()
                if not (member.isfile() or member.isdir()) or not target.is_relative_to(
                    dest.resolve()
                ):
                    raise BuildError(f"{SDIST}: unexpected member {member.name!r}")
            tar.extractall(dest)  # noqa: S202 - every member checked above
    tree = dest / f"pyfuse3-{VERSION}"
    if not (tree / "src/pyfuse3/handlers.pxi").is_file():
        raise BuildError(f"{SDIST}: no src/pyfuse3/handlers.pxi")
    return tree


def _patch(tree: Path, patch_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # Exactly as written: no fuzz, no reversed or already applied patch, no questions.
    command = ["patch", "-p1", "--forward", "--batch", "--fuzz=0", "--no-backup-if-mismatch"]
    try:
        return subprocess.run(
            [*command, *extra, "-d", str(tree), "-i", str(patch_file)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise BuildError("the 'patch' program is missing (apt-get install patch)") from None


def apply_patches(tree: Path) -> None:
    """Check that each patch applies exactly, then apply it; in name order.

    Raises:
        BuildError: a patch does not apply (the tree is then as the earlier patches left it).
    """
    for patch_file in patches():
        check = _patch(tree, patch_file, "--dry-run")
        if check.returncode != 0:
            lines = (check.stdout + check.stderr).strip().splitlines()
            why = "; ".join(line.strip() for line in lines if "FAILED" in line or "can't" in line)
            raise BuildError(
                f"{patch_file.name} does not apply to pyfuse3 {VERSION}: {why or 'patch failed'}"
            )
        applied = _patch(tree, patch_file, "--quiet")
        if applied.returncode != 0:
            raise BuildError(f"{patch_file.name}: patch exited {applied.returncode}")


def keep_sdist(archive: Path) -> None:
    """Inside a virtualenv, keep the checked release for the tests (no download there)."""
    if sys.prefix == sys.base_prefix:
        return
    dest = Path(sys.prefix) / "share" / "envfs"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(archive, dest / SDIST)


def build_and_install(tree: Path) -> None:
    env = dict(os.environ, SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3=LOCAL_VERSION)
    pip("install", "--quiet", str(tree), env=env)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Install pyfuse3 with envfs's patches (scripts/pyfuse3/)."
    )
    parser.add_argument(
        "--force", action="store_true", help="build even if this build is installed already"
    )
    args = parser.parse_args()
    if not args.force and installed_has_handler():
        return 0
    print(f"building pyfuse3 {LOCAL_VERSION} (pyfuse3 {VERSION} with envfs's patches)", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="envfs-pyfuse3-") as tmp:
            archive = download(Path(tmp))
            tree = extract(archive, Path(tmp))
            apply_patches(tree)
            build_and_install(tree)
            keep_sdist(archive)
        if not installed_has_handler():
            raise BuildError("the installed pyfuse3 lacks envfs's changes")
    except (BuildError, OSError, tarfile.TarError) as exc:
        print(f"build_pyfuse3: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
