#!/usr/bin/env bash
# The test entry point (README's test command; .ci/run calls it).
# Installs what the tests need from Debian when missing, starts a Docker engine when `docker info`
# fails (and stops the one it started), makes room on disk (tests/disk.sh), then runs pytest with any
# extra arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
command -v go >/dev/null 2>&1 || need_pkgs+=(golang-go)
command -v cmake >/dev/null 2>&1 || need_pkgs+=(cmake)
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)  # the chat page's browser tests (Playwright)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: missing ${need_pkgs[*]}; install them (apt-get install ${need_pkgs[*]}) or run as root" >&2
    exit 2
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

started_dockerd=""
disk_checked=""
stop_dockerd() {
  if [ -n "$disk_checked" ]; then bash tests/disk.sh after || true; fi
  if [ -n "$started_dockerd" ]; then
    kill "$started_dockerd" 2>/dev/null || true
    wait "$started_dockerd" 2>/dev/null || true
  fi
}
trap stop_dockerd EXIT

if ! docker info >/dev/null 2>&1; then
  bash tests/docker-plugins.sh
  dockerd >"${TMPDIR:-/tmp}/gptoss-dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$started_dockerd" 2>/dev/null || { cat "${TMPDIR:-/tmp}/gptoss-dockerd.log" >&2; exit 1; }
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "tests/run.sh: dockerd did not come up" >&2; exit 1; }
else
  bash tests/docker-plugins.sh
fi

# Room for the image builds (prunes Docker's build cache when short); bounded again on exit.
bash tests/disk.sh before
disk_checked=1

# Every tool is installed now: a test missing one fails instead of skipping (tests/conftest.py).
export GPTOSS_REQUIRE_TOOLS=1 TESTCONTAINERS_RYUK_DISABLED=true TESTCONTAINERS_CONNECTION_MODE=docker_host
# GPU tests run on a GPU machine (pytest -m gpu), never in CI.
python3 -m pytest -m "not gpu" "$@"
