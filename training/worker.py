"""The torchrun worker that `gptoss train --gpus N` starts (training/distributed.py ``launch``).

Its argument is the resolved flags as JSON, passed to ``train`` as they are (no second CLI parse).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from gptoss.errors import ToolchainError


def main(argv: list[str] | None = None) -> int:
    """A torchrun worker started by ``launch``: argv[0] is the resolved flags as JSON (no second parse)."""
    from gptoss.training import distributed
    from gptoss.training.run import train

    distributed.die_with_parent(signal.SIGKILL)  # torchrun gone (killed): stop too
    if os.getppid() == 1:  # it died before the line above
        return 1
    flags = json.loads((argv if argv is not None else sys.argv[1:])[0])
    try:
        train(**flags)
    except ToolchainError as e:
        print(f"gptoss: error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
