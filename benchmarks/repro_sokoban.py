"""Reproduction benchmark: does LEAFE widen pass@k against rejection-sampling SFT? (issue 12)

    python benchmarks/repro_sokoban.py --preset tiny     # CI miniature (< 1 minute)
    python benchmarks/repro_sokoban.py --preset cpu      # the CPU run (results in benchmarks/results/)
    python benchmarks/repro_sokoban.py --preset gpu      # scaled for one H100/H200

The same as ``leafe-fast repro``; the stages live in ``leafe_fast.repro`` (see its pipeline module).
"""

from __future__ import annotations

import sys

from leafe_fast.repro.command import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
