"""Two-stage nearest-neighbour search (`brics nn-search`) against brute force, on a 2,000-image set.

Reference: 2,000 training crops of `brics shard demo` (64x64, the six training photos). Queries:
`--queries` images, half fresh random crops of the same photos (seed 1: like samples of a model
trained on them), half crops of the two held-out photos. For each number of candidates M the search
is compared with brute force: the fraction of queries whose top-k SET equals brute force's, the
fraction certified exact by the lower bound, exact distances computed, and time.

    python benchmarks/nn_search.py --out benchmarks/out/nn_search.json

`--metric lpips` needs the AlexNet weights (`brics weights status`); `l2` needs none.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from brics_cli.data.shards import ShardOptions, write_shards
from brics_cli.data.sources.demo import list_demo, process_demo
from brics_cli.eval.nn_search import ImageBank, L2Distance, LPIPSDistance, embeddings, search


def demo_images(out: Path, train: int, val: int, seed: int) -> dict[str, list[Path]]:
    options = ShardOptions(resolution=64, shard_size=500, seed=seed, small="upscale", extra=(("train_count", train), ("val_count", val)))
    write_shards(out / "shards", list_demo(train, val), process_demo, options, {"type": "demo"})
    os.environ["BRICS_CACHE_DIR"] = str(out / "cache")
    from brics_cli.eval.image_sets import export_shards

    return {split: export_shards(out / "shards", split).files for split, n in (("train", train), ("val", val)) if n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--candidates", type=int, nargs="+", default=[20, 50, 100, 200])
    parser.add_argument("--metric", choices=("l2", "lpips"), default="l2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        ref_files = demo_images(Path(tmp) / "ref", args.reference, 0, seed=0)["train"]
        half = args.queries // 2
        fresh = demo_images(Path(tmp) / "q", half, args.queries - half, seed=1)
        query_files = fresh["train"] + fresh["val"]
        if args.metric == "lpips":
            from brics_cli.nets.perceptual import load_lpips

            metric = LPIPSDistance(load_lpips("alex"))
        else:
            metric = L2Distance()
        bank = ImageBank(ref_files)
        queries = ImageBank(query_files).get(range(len(query_files)))
        bank.get(range(len(bank)))  # decode once, outside the timings

        start = time.perf_counter()
        brute = search(queries, bank, metric, args.k, exact=True, batch=256)
        brute_s = time.perf_counter() - start
        start = time.perf_counter()
        emb = embeddings(bank, metric, 256)
        embed_s = time.perf_counter() - start
        truth = [set(row) for row in brute.indices.tolist()]
        rows = []
        for m in args.candidates:
            start = time.perf_counter()
            result = search(queries, bank, metric, args.k, candidates=m, batch=256, reference_embeddings=emb)
            seconds = time.perf_counter() - start
            same = sum(set(row) == t for row, t in zip(result.indices.tolist(), truth))
            rows.append({
                "candidates": m,
                "same_top_k": same / len(truth),
                "certified": sum(bool(c) for c in result.certified) / len(truth),
                "exact_distances": result.exact_distances,
                "fewer_exact_distances": brute.exact_distances / result.exact_distances,
                "seconds": round(seconds, 3),
                "seconds_with_embedding": round(seconds + embed_s, 3),
            })
            print(f"M={m:4d}: same top-{args.k} {same}/{len(truth)}, certified {rows[-1]['certified']:.0%}, "
                  f"{result.exact_distances} exact distances ({rows[-1]['fewer_exact_distances']:.0f}x fewer), "
                  f"{seconds:.2f} s (+{embed_s:.2f} s embedding the reference once)")
        print(f"brute force: {brute.exact_distances} exact distances, {brute_s:.2f} s")

    report = {
        "benchmark": "nn_search",
        "metric": metric.describe(),
        "reference": len(ref_files),
        "queries": len(query_files),
        "k": args.k,
        "brute_force": {"exact_distances": brute.exact_distances, "seconds": round(brute_s, 3)},
        "embedding_seconds": round(embed_s, 3),
        "two_stage": rows,
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
