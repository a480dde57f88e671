"""Rows per class of zsd's pairwise design vs allpairspy's greedy (what the paper used).

    python tools/bench_prompts.py [--skip-slow]

allpairspy on 30^4 takes minutes; --skip-slow leaves it out.
"""

import argparse
import time

from allpairspy import AllPairs

from zsd.prompts import covering_array, lower_bound, verify_pairwise

SHAPES = [(15,) * 4, (30,) * 4, (15,) * 5, (15, 12, 10, 8)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-slow", action="store_true", help="skip allpairspy on 30^4")
    args = parser.parse_args()
    print("| option counts | lower bound | zsd rows | allpairspy rows | zsd saves |")
    print("|---|---|---|---|---|")
    for sizes in SHAPES:
        t = time.time()
        rows = covering_array(sizes)
        assert verify_pairwise(rows, sizes) == []
        zsd_s = time.time() - t
        if args.skip_slow and sizes == (30,) * 4:
            print(f"| {'x'.join(map(str, sizes))} | {lower_bound(sizes)} | {len(rows)} | (skipped) | |", flush=True)
            continue
        t = time.time()
        theirs = [tuple(r) for r in AllPairs([list(range(s)) for s in sizes])]
        assert verify_pairwise(theirs, sizes) == []
        print(f"| {'x'.join(map(str, sizes))} | {lower_bound(sizes)} | {len(rows)} ({zsd_s:.2f} s) | "
              f"{len(theirs)} ({time.time() - t:.1f} s) | {1 - len(rows) / len(theirs):.0%} |", flush=True)


if __name__ == "__main__":
    main()
