"""The container plumbing every image test relies on: local base image, CA secret, build, run."""

import subprocess
import uuid

import pytest

from conftest import REPO, docker_build

pytestmark = pytest.mark.docker


def test_trivial_image_builds_on_local_base_and_runs(base_image):
    tag = f"gptoss-smoke:{uuid.uuid4().hex[:8]}"
    docker_build(REPO / "tests" / "smoke_image", tag, *base_image.build_flags())
    try:
        run = subprocess.run(["docker", "run", "--rm", tag], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("smoke-ok 1.16.0"), run.stdout
        # The CA bundle went in as a secret: it must not be in the image's layers or history.
        history = subprocess.run(["docker", "history", "--no-trunc", tag], capture_output=True, text=True).stdout
        assert "BEGIN CERTIFICATE" not in history
        files = subprocess.run(
            ["docker", "run", "--rm", tag, "sh", "-c", "ls /run/secrets 2>/dev/null | wc -l"],
            capture_output=True, text=True,
        )
        assert files.stdout.strip() == "0"
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
