#!/usr/bin/env bash
# Disk for the container tests: `before` makes room (or stops with one clear line), `after` leaves
# Docker's build cache bounded so the next run starts warm but repeated runs don't fill the disk.
#   GPTOSS_TEST_DISK_GB  free space a cold run needs under Docker's root and $TMPDIR (default 32: a cold run peaked at ~26 GB)
#   GPTOSS_KEEP_CACHE_GB build cache kept between runs (default 20: llama.cpp builds, train venv)
set -euo pipefail
need_gb=${GPTOSS_TEST_DISK_GB:-32}
keep_gb=${GPTOSS_KEEP_CACHE_GB:-20}
docker_root=$(docker info -f '{{.DockerRootDir}}')
tmp=${TMPDIR:-/tmp}

free_gb() { df -Pk "$1" | awk 'NR==2 {print int($4 / 1048576)}'; }
least_free() { local a b; a=$(free_gb "$docker_root"); b=$(free_gb "$tmp"); echo $((a < b ? a : b)); }

case "${1:-}" in
  before)
    docker image prune -f >/dev/null
    if [ "$(least_free)" -lt "$need_gb" ]; then
      echo "tests/disk.sh: $(least_free) GB free, need $need_gb; pruning Docker's build cache to ${keep_gb} GB" >&2
      docker buildx prune -f --keep-storage "${keep_gb}GB" >/dev/null
    fi
    if [ "$(least_free)" -lt "$need_gb" ]; then
      echo "tests/disk.sh: still $(least_free) GB free; pruning all of Docker's build cache" >&2
      docker buildx prune -af >/dev/null
    fi
    free=$(least_free)
    if [ "$free" -lt "$need_gb" ]; then
      echo "tests/disk.sh: the container tests need ${need_gb} GB free under $docker_root and $tmp;" \
           "only ${free} GB are free after pruning Docker's build cache. Free disk space" \
           "(or set GPTOSS_TEST_DISK_GB if you know a run needs less) and run again." >&2
      exit 1
    fi
    echo "tests/disk.sh: ${free} GB free (need ${need_gb})"
    ;;
  after)
    docker images --format '{{.Repository}}:{{.Tag}}' | grep '^gptoss-test/' | xargs -r docker image rm -f >/dev/null || true
    docker image prune -f >/dev/null
    docker buildx prune -f --keep-storage "${keep_gb}GB" >/dev/null
    echo "tests/disk.sh: $(least_free) GB free after the run; Docker's build cache bounded to ${keep_gb} GB"
    ;;
  *)
    echo "usage: tests/disk.sh before|after" >&2
    exit 2
    ;;
esac
