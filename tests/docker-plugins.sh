#!/usr/bin/env bash
# Compose v2 and buildx are not in Debian bookworm; trixie's packages are static binaries.
# Fetch them with apt from a trixie source list (no system change) and unpack the CLI plugins.
set -euo pipefail
if docker compose version >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/debs" "$work/x"
echo "deb http://deb.debian.org/debian trixie main" >"$work/sources.list"
apt_opts=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$work/lists" -o Dir::Cache::Archives="$work/archives")
apt-get "${apt_opts[@]}" update -qq
(cd "$work/debs" && apt-get "${apt_opts[@]}" download docker-compose docker-buildx 2>/dev/null)
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$work/x"; done
mkdir -p /usr/libexec/docker/cli-plugins
install -m 0755 "$work"/x/usr/libexec/docker/cli-plugins/docker-* /usr/libexec/docker/cli-plugins/
docker compose version && docker buildx version
