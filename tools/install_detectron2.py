"""Install Detectron2 into the running interpreter's environment, offline-friendly.

Detectron2 is not published on PyPI. Routes, tried in order, the first that works wins:

1. ``keep``: an importable detectron2 is already installed (full upstream build or an earlier run).
2. ``github``: the official source build from GitHub (full C++/CUDA ops). Machines without GitHub
   access fail this within seconds (``git ls-remote`` with a short timeout decides).
3. ``pypi-pb1``: PyPI's ``pb1-detectron2==0.6`` sdist, a copy of upstream v0.6's Python sources
   whose sdist lacks ``layers/csrc``. It is built with its C++ extension list emptied; the missing
   ``detectron2._C`` is then provided by :mod:`bissl_det.compat` (every op raises a clear error).

The route taken is printed as ``detectron2 route: <name>`` so CI logs say which one was used.
Run it with the target interpreter: ``.venv/bin/python tools/install_detectron2.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

GITHUB_URL = "https://github.com/facebookresearch/detectron2.git"
PB1_NAME = "pb1-detectron2-0.6.tar.gz"
PB1_URL = (
    "https://files.pythonhosted.org/packages/60/26/"
    "48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/" + PB1_NAME
)
PB1_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# detectron2.model_zoo imports pkg_resources, which setuptools 82 removed.
BUILD_REQUIREMENTS = ["setuptools<82", "wheel"]


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def detectron2_importable() -> bool:
    probe = "import detectron2, detectron2.config"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def github_reachable(timeout_s: float) -> bool:
    try:
        subprocess.run(
            ["git", "ls-remote", GITHUB_URL, "HEAD"],
            capture_output=True,
            timeout=timeout_s,
            check=True,
        )
    except (subprocess.SubprocessError, FileNotFoundError):
        return False
    return True


def install_from_github() -> None:
    pip("install", "--no-build-isolation", f"git+{GITHUB_URL}")


def fetch_pb1_sdist(dest: Path, cache_dir: Path) -> Path:
    """Download the sdist (or reuse a cached copy) and check its sha256 before it is used."""
    cached = cache_dir / PB1_NAME
    if not cached.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".part")
        with urllib.request.urlopen(PB1_URL, timeout=120) as response:
            partial.write_bytes(response.read())
        partial.rename(cached)
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    if digest != PB1_SHA256:
        cached.unlink()
        raise SystemExit(f"{PB1_NAME}: sha256 {digest} does not match the pinned {PB1_SHA256}")
    with tarfile.open(cached) as tar:
        tar.extractall(dest, filter="data")
    return dest / "pb1-detectron2-0.6"


def install_pb1_without_extension(cache_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = fetch_pb1_sdist(Path(tmp), cache_dir)
        setup_py = source / "setup.py"
        text = setup_py.read_text()
        patched, count = re.subn(r"ext_modules=get_extensions\(\),", "ext_modules=[],", text)
        if count != 1:
            raise SystemExit(f"{setup_py}: expected one 'ext_modules=get_extensions()' to disable")
        setup_py.write_text(patched)
        pip("install", *BUILD_REQUIREMENTS)
        pip("install", "--no-build-isolation", str(source))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--github-timeout", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bissl_det",
        help="where the pb1-detectron2 sdist is kept between installs",
    )
    parser.add_argument("--force", action="store_true", help="reinstall even if importable")
    args = parser.parse_args()

    if not args.force and detectron2_importable():
        route = "keep"
    elif github_reachable(args.github_timeout):
        install_from_github()
        route = "github"
    else:
        print("GitHub unreachable: building pb1-detectron2==0.6 without its C++ extension")
        install_pb1_without_extension(args.cache_dir)
        route = "pypi-pb1"
    print(f"detectron2 route: {route}", flush=True)


if __name__ == "__main__":
    main()
