"""The output projection of tiny.en's vocabulary (50257 x 384, float32) as the numpy engine runs it: a few
hidden states times the projection, stored either way round, and the probability of each row's best token,
by a whole softmax or by one in-place log-sum-exp. One process, one run: each line prints the ratio of
the two ways measured side by side (median of --repeats interleaved timings), not absolute targets.

    python scripts/bench_projection.py                 # 2 threads
    python scripts/bench_projection.py --threads 1 --rows 1 4 13 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 13, 64])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import numpy as np

    from whisfusion_cli.verify import _probability_of_best
    from whisfusion_cli.numpy_model import softmax

    rng = np.random.default_rng(0)
    table = rng.standard_normal((50257, 384)).astype(np.float32)  # [n_logits, d], as the token table
    transposed = np.ascontiguousarray(table.T)  # [d, n_logits], as NumpyDecoder.head keeps it
    print(f"{'rows':>5}  {'[V,d].T ms':>10}  {'[d,V] ms':>9}  {'ratio':>6}  {'softmax ms':>10}  {'lse ms':>7}  {'ratio':>6}")
    for n in args.rows:
        hidden = rng.standard_normal((n, 384)).astype(np.float32)
        a = _median_seconds(lambda: hidden @ table.T, args.repeats)
        b = _median_seconds(lambda: hidden @ transposed, args.repeats)
        logits = hidden @ transposed
        assert np.allclose(logits, hidden @ table.T, rtol=1e-4, atol=1e-3)
        exact = softmax(logits).max(-1)
        assert np.allclose(_probability_of_best(logits.copy()), exact, rtol=1e-5)
        c = _median_seconds(lambda: softmax(logits).max(-1), args.repeats)
        d = _median_seconds(lambda: _probability_of_best(logits.copy()), args.repeats)
        print(f"{n:5d}  {a * 1e3:10.2f}  {b * 1e3:9.2f}  {a / b:5.2f}x  {c * 1e3:10.2f}  {d * 1e3:7.2f}  {c / d:5.2f}x")


if __name__ == "__main__":
    main()
