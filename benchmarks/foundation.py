"""Training and batch-1 decode throughput on the reference shape (issue #2).

Reference shape: d_model 256, 4 heads, vocab 4096, 3 core layers x T 4. Training: batch 8 x 256,
Stage I objective, AdamW step. Decode: batch 1, 128-token prompt, 128 new tokens, greedy.
Prints the figures and, with --json, writes them. Targets on a 2-core CPU: training >= 1,200
tokens/s, decode >= 500 tokens/s (the best public looped-LM code: ~1,170 and ~110).

    python benchmarks/foundation.py --compile --json bench.json
"""

import argparse

from looplm.bench import run_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run_bench(args.json, args.threads, args.compile, args.repeats)
