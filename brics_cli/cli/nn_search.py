"""`brics nn-search`: each sample's k nearest training images (Fig. 8), as nn.json and a contact sheet."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from brics_cli.cli.output import emit_json


def nn_search_command(
    samples: Optional[Path] = typer.Option(None, "--samples", help="`brics sample` output. Default: the newest under --runs."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Training shard folder or image folder. Default: the data recorded for the samples."),
    split: str = typer.Option("train", "--split", help="Split of the reference shards."),
    k: int = typer.Option(5, "--k", help="Neighbours per sample."),
    queries: Optional[int] = typer.Option(None, "--queries", help="Search for the first N samples (default: all)."),
    metric: str = typer.Option("lpips", "--metric", help="lpips (the paper's, needs AlexNet weights) | l2 (no weights)."),
    candidates: int = typer.Option(64, "--candidates", help="Images re-ranked exactly per sample after the embedding stage."),
    exact: bool = typer.Option(False, "--exact", help="Brute force: the exact distance to every reference image."),
    grid_rows: int = typer.Option(16, "--grid-rows", help="Samples shown in nn-grid.png."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder for nn.json and nn-grid.png (default: the samples folder)."),
    batch: int = typer.Option(64, "--batch", help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where to look for the newest samples when --samples is not given."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    """For each sample, its k nearest training images: a cheap lower-bound embedding picks --candidates images
    with blockwise matrix products, their exact distance (LPIPS-AlexNet or L2) re-ranks them; --exact is brute
    force. Writes nn.json {"metric", "k", "queries": [{"sample", "neighbours": [{"key", "distance"}]}]} and nn-grid.png."""
    from brics_cli.errors import ConfigError
    from brics_cli.eval.sources import load_samples, newest_samples, recorded_reference

    if metric not in ("lpips", "l2"):
        raise ConfigError(f"--metric must be lpips or l2, got '{metric}'")
    if k < 1 or candidates < 1 or batch < 1 or (queries is not None and queries < 1):
        raise ConfigError("--k, --candidates, --batch and --queries must be >= 1")
    folder = samples if samples is not None else newest_samples(runs)
    if samples is None:
        print(f"samples: {folder} (newest `brics sample` output under {runs}/)", file=sys.stderr)
    sample_set = load_samples(folder, queries)
    weight_names = ["alexnet", "lpips-lin-alex"] if metric == "lpips" else []
    from brics_cli.eval import weights

    weights.require_all(weight_names)  # before any work
    recorded = recorded_reference(sample_set)
    if ref is None and recorded is None:
        raise ConfigError(f"no training data recorded for {folder}; pass --ref SHARDS")

    from brics_cli.cli.progress import lazy_bar, resolve_device, stage_progress
    from brics_cli.data.shards import write_json_atomic
    from brics_cli.eval.nn_search import ImageBank, L2Distance, LPIPSDistance, cached_embeddings, contact_sheet, embedding_cache_key, search
    from brics_cli.eval.sources import cache_root, load_reference

    dev = resolve_device(device)
    out = out or folder
    with stage_progress() as start:
        reference = load_reference(ref or recorded, split, None, lazy_bar(start, "export reference"))
        print(f"reference: {reference.describe()}", file=sys.stderr)
        if metric == "lpips":
            from brics_cli.eval.recon import load_lpips

            distance = LPIPSDistance(load_lpips("alex", dev))
        else:
            distance = L2Distance()
        bank = ImageBank(reference.files)
        query_bank = ImageBank(sample_set.files)
        q_images = query_bank.get(range(len(query_bank)))
        if q_images.shape[-2:] != bank.get([0]).shape[-2:]:
            raise ConfigError(f"samples are {tuple(q_images.shape[-2:])} and reference images {tuple(bank.get([0]).shape[-2:])}: sizes must match")
        emb = None
        if not exact:
            shas = [weights.describe(w)["sha256"] for w in weight_names]
            key = embedding_cache_key(distance, reference.fingerprint, len(bank), shas)
            emb = cached_embeddings(cache_root() / "nn" / f"embed-{metric}-{key}.npy", bank, distance, batch, start("embed reference", len(bank)))
        result = search(q_images, bank, distance, k, candidates, exact, batch, emb, progress=start)

    keys = [p.stem for p in reference.files]
    report = {
        "metric": metric,
        "k": int(result.indices.shape[1]),
        "queries": [
            {
                "sample": sample_set.files[q].name,
                "neighbours": [{"key": keys[i], "distance": float(d)} for i, d in zip(result.indices[q].tolist(), result.distances[q])],
                "certified": result.certified[q],
            }
            for q in range(len(sample_set.files))
        ],
        "search": {
            "mode": result.mode,
            "candidates": result.candidates,
            "exact_distances": result.exact_distances,
            "brute_force_distances": len(sample_set.files) * len(bank),
            "certified": sum(bool(c) for c in result.certified),
            "distance": distance.describe(),
            "reference": {"path": str(reference.path), "source": reference.source, "split": reference.split,
                          "manifest_sha256": reference.manifest_sha256, "n": len(bank)},
            "samples": str(folder),
            "weights": [weights.describe(w) for w in weight_names],
            "device": str(dev),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "nn.json", report)
    rows = [[q_images[q]] + [bank.get([i])[0] for i in result.indices[q].tolist()] for q in range(min(grid_rows, len(q_images)))]
    contact_sheet(rows).save(out / "nn-grid.png")
    summary = {"out": str(out), "queries": len(report["queries"]), **{k_: report["search"][k_] for k_ in
               ("mode", "candidates", "exact_distances", "brute_force_distances", "certified")}}
    if json_output:
        emit_json(summary)
    else:
        s = report["search"]
        print(f"{len(report['queries'])} samples x {report['k']} neighbours ({metric}, {s['mode']}): {s['exact_distances']} exact "
              f"distances of {s['brute_force_distances']} for brute force; {s['certified']} certified exact; "
              f"wrote {out / 'nn.json'} and {out / 'nn-grid.png'}")
