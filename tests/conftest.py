"""Shared test fixtures: the tiny gpt-oss checkpoint and the Docker base image.

No image registry is reachable, so container tests build FROM a base image bootstrapped here with
debootstrap (cached per machine by a content tag). TLS to PyPI is re-signed by a local CA, so
builds get the host's CA bundle as a BuildKit secret (never baked into a layer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def missing_tool(msg: str) -> None:
    """Skip a test whose tool is missing, but fail under tests/run.sh (GPTOSS_REQUIRE_TOOLS=1), which
    installs every tool: there a skip would hide a test that never ran."""
    if os.environ.get("GPTOSS_REQUIRE_TOOLS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny gpt-oss checkpoint (seed 0) with the real tokenizer, written once per session by the
    command users run: `gptoss fixture tiny --out DIR`."""
    out = tmp_path_factory.mktemp("fixture") / "tiny"
    proc = subprocess.run([sys.executable, "-m", "gptoss", "fixture", "tiny", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out), proc.stdout
    return out


# ---------------------------------------------------------------------------------------------
# Docker


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Skips container tests when no engine runs (fails under tests/run.sh, which starts one)."""
    if not docker_available():
        missing_tool("no Docker engine: run the tests through `bash tests/run.sh`, which starts one")


BASE_SUITE = "bookworm"
BASE_MIRROR = os.environ.get("GPTOSS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_RECIPE = f"debootstrap --variant=minbase --include={','.join(BASE_PACKAGES)} {BASE_SUITE} {BASE_MIRROR}"


@dataclasses.dataclass(frozen=True)
class BaseImage:
    """A locally built base image, and how a build lets pip inside trust the host's CA bundle."""

    name: str
    ca_bundle: Path | None

    def build_flags(self, arg: str = "BASE_IMAGE") -> list[str]:
        """`docker buildx build` flags: the base image as a build arg, the CA bundle as secret `ca`."""
        flags = ["--build-arg", f"{arg}={self.name}"]
        if self.ca_bundle is not None:
            flags += ["--secret", f"id=ca,src={self.ca_bundle}"]
        return flags


def host_ca_bundle() -> Path | None:
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def build_base_image() -> str:
    """debootstrap a minimal bookworm with python3 and import it; the tag is the recipe's hash."""
    tag = hashlib.sha256(BASE_RECIPE.encode()).hexdigest()[:12]
    name = f"gptoss-base:{BASE_SUITE}-{tag}"
    if subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0:
        return name
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is missing: apt-get install debootstrap (tests/run.sh does)")
    with tempfile.TemporaryDirectory(prefix="gptoss-rootfs-") as root:
        cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", BASE_SUITE, root, BASE_MIRROR]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"debootstrap failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(Path(root) / junk, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["docker", "import", "-", name], stdin=tar.stdout, capture_output=True, text=True)
        tar.stdout.close()
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"docker import failed: {imp.stderr}")
    return name


@pytest.fixture(scope="session")
def base_image(docker_engine) -> BaseImage:
    return BaseImage(name=build_base_image(), ca_bundle=host_ca_bundle())


def hub_cache_holding(model_dir: Path, repo_id: str, hub_cache: Path, commit: str) -> Path:
    """``hub_cache`` (HF_HUB_CACHE, i.e. HF_HOME/hub) holding ``model_dir`` as ``repo_id`` at main,
    laid out as huggingface_hub writes it: blobs named by their sha256, snapshots/<commit>/ linking
    to them, refs/main. Returns the snapshot folder."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snap, blobs = repo / "snapshots" / commit, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in model_dir.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def compose_config(env: dict | None = None) -> dict:
    """compose.yaml as `docker compose config` resolves it (every profile), with only ``env`` set."""
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        missing_tool("docker compose is not installed (tests/run.sh installs it)")
    proc = subprocess.run(["docker", "compose", "--profile", "*", "config", "--format", "json"], cwd=REPO,
                          capture_output=True, text=True, env={"PATH": "/usr/local/bin:/usr/bin:/bin", **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def docker_build(context: Path, tag: str, *flags: str, dockerfile: Path | None = None, target: str | None = None) -> None:
    """BuildKit build (buildx, loaded into the local engine); raises with the build log on failure."""
    cmd = ["docker", "buildx", "build", "--load", "-t", tag, *flags]
    if dockerfile is not None:
        cmd += ["-f", str(dockerfile)]
    if target is not None:
        cmd += ["--target", target]
    cmd.append(str(context))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"docker build of {tag} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="session")
def harmony_models(tiny_model, request, tmp_path_factory) -> dict[str, Path]:
    """Adapter / merged / GGUF taught Harmony answers (tests/serve_support.py), for the serve, chat and bench
    tests; cached in pytest's cache by recipe hash, so built once."""
    import serve_support as sup

    key = sup.source_key() + "-" + hashlib.sha256((Path(tiny_model) / "fixture.json").read_bytes()).hexdigest()[:8]
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("gptoss-serve-models")) if cache is not None else tmp_path_factory.mktemp("serve-models")
    return sup.build_harmony_models(tiny_model, root / key)
