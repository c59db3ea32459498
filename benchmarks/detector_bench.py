"""Detector speed benchmark; the code lives in linewatch/eval/bench.py (also `linewatch bench`).

    python benchmarks/detector_bench.py [--batch-sizes 1 4 8] [--repeats 5] [--out bench.json]
"""

import sys

from linewatch.eval.bench import main

if __name__ == "__main__":
    sys.exit(main())
