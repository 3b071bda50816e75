"""Write compose.replicas.yaml: one llama.cpp serving replica per GPU in SERVE_GPUS, behind serve-lb,
and serve-vllm on all of them (tensor-parallel).

    python3 docker/replicas.py        # SERVE_GPUS from the environment, else from .env, else 0,1
    docker compose -f compose.yaml -f compose.replicas.yaml --profile serve-replicas up -d

Compose cannot loop over a list, so this turns the list into services: serve-replica-<k> for the k-th
GPU, each the serve-llamacpp service (`extends`) pinned to that one GPU, with no published port
(serve-lb, HAProxy on ${SERVE_LB_PORT:-8003}, is the endpoint; docker/haproxy.cfg names
serve-replica-0 .. serve-replica-7). serve-vllm gets every listed GPU (`--profile serve-vllm` with the
same two files). Run it again after changing SERVE_GPUS. Needs Compose >= 2.24.4
(the !reset / !override tags). Standard library only: it runs before any environment is installed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_REPLICAS = 8  # the server lines in docker/haproxy.cfg
DEFAULT_GPUS = "0,1"
# nvidia-smi's index or its UUID, as compose's device_ids takes them
GPU_ID = re.compile(r"^(\d+|GPU-[0-9A-Fa-f-]+|MIG-[0-9A-Fa-f/-]+)$")


class ReplicasError(ValueError):
    pass


def replica_name(k: int) -> str:
    return f"serve-replica-{k}"


def gpus_from(env: dict[str, str], dotenv: Path) -> tuple[str, str]:
    """(SERVE_GPUS, where it came from): the environment wins over .env, as in compose."""
    if "SERVE_GPUS" in env:
        return env["SERVE_GPUS"], "the environment"
    if dotenv.is_file():
        for line in dotenv.read_text().splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key.strip() == "SERVE_GPUS":
                return value.split("#", 1)[0].strip().strip("'\""), str(dotenv)
    return DEFAULT_GPUS, "the default"


def parse_gpus(value: str, source: str) -> list[str]:
    gpus = [g.strip() for g in value.split(",") if g.strip()]
    problems = [f"{g!r} is not a GPU index or UUID (as nvidia-smi -L lists them)" for g in gpus if not GPU_ID.match(g)]
    if not gpus:
        problems.append("it lists no GPU")
    if len(set(gpus)) != len(gpus):
        problems.append("a GPU is listed twice (one replica per GPU)")
    if len(gpus) > MAX_REPLICAS:
        problems.append(f"it lists {len(gpus)} GPUs; docker/haproxy.cfg has server lines for {MAX_REPLICAS}: add lines there and raise MAX_REPLICAS")
    if problems:
        raise ReplicasError(f"SERVE_GPUS={value!r} (from {source}): " + "; ".join(problems) + ". Give comma-separated GPU ids, e.g. SERVE_GPUS=0,1")
    return gpus


def render(gpus: list[str], compose_file: str = "compose.yaml") -> str:
    """The override's text; ``compose_file`` is compose.yaml's path from the override's folder. JSON
    scalars are YAML scalars; the tags need YAML."""
    q = json.dumps
    lines = ["# Written by docker/replicas.py from SERVE_GPUS=" + ",".join(gpus) + "; run it again, do not edit.", "services:"]
    for k, gpu in enumerate(gpus):
        lines += [
            f"  {replica_name(k)}:",
            f"    extends: {{ file: {q(compose_file)}, service: serve-llamacpp }}",
            f"    profiles: !override [{q('serve-replicas')}]",
            "    ports: !reset []",
            "    deploy:",
            "      resources:",
            "        reservations:",
            "          devices: !override",
            f"            - {{ driver: nvidia, device_ids: [{q(gpu)}], capabilities: [gpu] }}",
        ]
    lines += ["  serve-lb:", "    depends_on:"]
    lines += [f"      {replica_name(k)}: {{ condition: service_started }}" for k in range(len(gpus))]
    # serve-vllm (its own profile) takes every listed GPU: its tensor-parallel size is the number it sees
    lines += ["  serve-vllm:", "    deploy:", "      resources:", "        reservations:", "          devices: !override",
              f"            - {{ driver: nvidia, device_ids: [{', '.join(q(g) for g in gpus)}], capabilities: [gpu] }}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else REPO / "compose.replicas.yaml"
    try:
        gpus = parse_gpus(*gpus_from(dict(os.environ), REPO / ".env"))
    except ReplicasError as e:
        print(f"docker/replicas.py: error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(gpus, os.path.relpath(REPO / "compose.yaml", out.resolve().parent)))
    tmp.replace(out)
    print(f"{out}: {len(gpus)} replicas ({', '.join(f'{replica_name(k)} on GPU {g}' for k, g in enumerate(gpus))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
