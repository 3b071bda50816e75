#!/usr/bin/env python3
"""F16 GGUF of an export vs its merged HF model, the way `gptoss export --compare-hf on` measures it.

    python3 bench/f16_vs_hf.py EXPORT_DIR [--threads N]

Prints the fidelity figures, and where the two disagree on the top token, how far the reference's
top token led there (near-ties are what the top-1 gate leaves out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from gptoss.exporters import fidelity as fid  # noqa: E402
from gptoss.exporters.quants import get_quant  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    root = Path(args.export_dir)
    (f16,) = root.glob("gguf/*-F16.gguf")
    tokens = fid.prompt_tokens()
    ref, test = fid.hf_logits(root / "merged", tokens), fid.gguf_logits(f16, tokens, threads=args.threads)
    f = fid.compare(ref, test)
    q = get_quant("f16")
    r, t = np.concatenate(ref), np.concatenate(test)
    top2 = np.sort(r, axis=1)[:, -2:]
    swaps = np.where(r.argmax(1) != t.argmax(1))[0]
    print(json.dumps({"file": f16.name, **dataclasses.asdict(f), "passes": f.passes(q.max_nmse, q.max_kl, q.min_top1),
                      "swaps": {int(i): round(float(top2[i, 1] - top2[i, 0]), 6) for i in swaps}}, indent=2))


if __name__ == "__main__":
    main()
