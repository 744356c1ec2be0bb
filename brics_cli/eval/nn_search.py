"""Nearest training images of generated samples (paper Sec. 4 "Nearest Neighbour Search", Fig. 8, 20, 22).

Two stages, so a 126k-image training set does not need 126k LPIPS evaluations per sample:

1. A cheap embedding e(x) of every image, built so that ||e(x) - e(y)||^2 is a LOWER BOUND of the
   exact distance d(x, y). The M reference images with the smallest embedding distance are the
   candidates, found with blockwise matrix products (memory O(Q (M + block))).
   - `l2` (d = mean squared pixel difference in [-1, 1]): e = s x s block averages of the image,
     scaled by 1 / sqrt(size of e). Block averaging is an orthogonal projection, so the projected
     part of the difference can only be smaller than the whole.
   - `lpips` (Zhang et al. 2018: d = sum_l mean_hw sum_c w_lc (f_l(x) - f_l(y))^2 with unit-normalised
     backbone features f_l and non-negative w): e = concat_l sqrt(w_l) * mean_hw f_l(x); by Jensen
     (the mean of squares is at least the square of the mean) this is a lower bound.
2. The exact distance of each candidate; the k best are the answer. Because of the bound, a query
   is *certified* -- provably the same k as brute force -- when its k-th exact distance is no larger
   than the embedding distance of the best image left out.

`exact=True` computes the exact distance to every reference image (brute force).

Under torchrun the ranks share the work in units one process uses too (ranks.py): the reference
embedding and the brute force by blocks of `batch` reference images, the re-ranking by groups of
queries; rank 0 writes nn.json, nn-grid.png and the embedding cache.

An image that does not decode is data, not a crash: an unreadable sample is no query, an unreadable
reference image is at infinite distance (its cached embedding row is NaN), and both are named in
nn.json's "search" -> "unreadable"; past `MAX_UNREADABLE` of either set no neighbours are reported.
"""

from __future__ import annotations

import hashlib
import os
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from brics_cli.core.images import ImageSkip, from_uint8, load_image, to_uint8
from brics_cli.core.runtime import Runtime
from brics_cli.eval.ranks import batch_block, everywhere, gather

QUERY_CHUNK = 256  # samples searched at once by brute force: bounds memory whatever the number of samples
RERANK_IMAGES = 512  # candidate images decoded and compared at once in the two-stage search


def rerank_group(m: int) -> int:
    """Queries whose m candidates each are decoded and compared together."""
    return max(1, RERANK_IMAGES // m)


class L2Distance:
    """Mean squared pixel difference of images in [-1, 1]; embedding: block averages on a grid x grid map."""

    name = "l2"

    def __init__(self, grid: int = 8):
        self.grid = grid

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images.double()]

    def paired_distances(self, queries: list[torch.Tensor], cands: list[torch.Tensor]) -> torch.Tensor:
        """queries (Q, ...) and their candidates (Q, M, ...) -> (Q, M)."""
        return (cands[0] - queries[0][:, None]).pow(2).flatten(2).mean(2)

    def cross_distances(self, queries: list[torch.Tensor], refs: list[torch.Tensor]) -> torch.Tensor:
        """(Q, B) distances of every query to every reference: |q|^2 + |r|^2 - 2 q.r in float64 (one matmul)."""
        q, r = queries[0].flatten(1), refs[0].flatten(1)
        sq = (q * q).sum(1, keepdim=True) + (r * r).sum(1) - 2 * q @ r.T
        return sq.clamp_min_(0) / q.shape[1]

    def embed(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[0]
        h, w = x.shape[-2:]
        g = self.grid
        if h % g or w % g:  # block averages need whole blocks; fall back to a grid that divides the image
            g = math.gcd(math.gcd(h, w), g)
        pooled = F.avg_pool2d(x, (h // g, w // g)).flatten(1)  # (B, 3 g g)
        return pooled / math.sqrt(pooled.shape[1])

    def describe(self) -> str:
        return f"l2: mean squared difference of pixels in [-1, 1]; embedding: {self.grid}x{self.grid} block averages"


class LPIPSDistance:
    """LPIPS (the `lpips` package's formula) from per-image backbone features; embedding: weighted global means."""

    name = "lpips"

    def __init__(self, model):
        import lpips

        self.model, self.normalize = model, lpips.normalize_tensor
        self.w = [lin.model[-1].weight.detach().flatten().double() for lin in model.lins]  # (C_l,) per layer
        self.bound_holds = all((w >= 0).all() for w in self.w)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        device = self.w[0].device
        outs = self.model.net(self.model.scaling_layer(images.float().to(device)))
        return [self.normalize(o).double() for o in outs]

    def paired_distances(self, queries: list[torch.Tensor], cands: list[torch.Tensor]) -> torch.Tensor:
        """queries: per layer (Q, C, H, W); candidates: per layer (Q, M, C, H, W) -> (Q, M)."""
        total = 0
        for fq, fc, w in zip(queries, cands, self.w):
            total = total + torch.einsum("qmchw,c->qm", (fc - fq[:, None]).pow(2), w) / (fc.shape[-2] * fc.shape[-1])
        return total.cpu()

    def cross_distances(self, queries: list[torch.Tensor], refs: list[torch.Tensor]) -> torch.Tensor:
        """(Q, B): every query against every reference, one query at a time (bounded memory)."""
        n_q = queries[0].shape[0]
        return torch.cat([self.paired_distances([f[q : q + 1] for f in queries], [r[None] for r in refs]) for q in range(n_q)])

    def embed(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([f.mean((2, 3)) * w.sqrt() for f, w in zip(feats, self.w)], 1).cpu()

    def describe(self) -> str:
        return "lpips v0.1 (backbone features, unit-normalised, weighted); embedding: sqrt(w)-weighted spatial means per layer"


class ImageBank:
    """Images of a file list by index, as [-1, 1] float tensors; decoded once and kept (uint8) while under a budget.

    A file that does not decode reads as a black image and is recorded in `unreadable` (index ->
    "PATH: reason") when first met; `excluded(indices)` says which indices those are.
    """

    def __init__(self, files: Sequence[Path], budget_bytes: int = 1 << 30):
        from brics_cli.errors import BricsError

        self.files = list(files)
        self.unreadable: dict[int, str] = {}
        first, image = 0, None
        while image is None and first < len(self.files):  # the first readable image gives the shape
            image = self.decode(first)
            first += image is None
        if self.files and image is None:
            raise BricsError(f"none of the {len(self.files)} images in {self.files[0].parent} decodes (first: {self.unreadable[0]})")
        self.shape = None if image is None else tuple(image.shape)  # (3, H, W)
        self.keep = image is not None and image.numel() * len(self.files) <= budget_bytes
        if self.keep:
            self.store = torch.zeros((len(self.files), *image.shape), dtype=torch.uint8)  # (N, 3, H, W); black = unreadable
            self.loaded = torch.zeros(len(self.files), dtype=torch.bool)
            self.loaded[: first + 1] = True  # the ones before `first` are unreadable: left black
            self.store[first] = image

    def decode(self, i: int) -> torch.Tensor | None:
        """uint8 (3, H, W) of file i, or None when it does not decode (then named in `unreadable`)."""
        if i in self.unreadable:
            return None
        try:
            return to_uint8(load_image(self.files[i]))
        except ImageSkip as skip:
            self.unreadable[i] = skip.detail
            return None

    def _image(self, i: int) -> torch.Tensor:
        image = self.decode(i)
        return torch.zeros(self.shape, dtype=torch.uint8) if image is None else image

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        try:
            if self.keep:
                for i in idx[~self.loaded[idx]].unique().tolist():
                    self.store[i], self.loaded[i] = self._image(i), True
                images = self.store[idx]
            else:
                images = torch.stack([self._image(i) for i in idx.tolist()])
        except RuntimeError as exc:
            from brics_cli.errors import BricsError

            raise BricsError(f"images of different sizes among {self.files[0].parent}: every image of a set must have one size") from exc
        return from_uint8(images)

    def excluded(self, indices: torch.Tensor) -> torch.Tensor:
        """Bool mask, shaped like `indices`: the ones found unreadable so far."""
        return torch.isin(indices, torch.tensor(sorted(self.unreadable), dtype=torch.long))

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class SearchResult:
    indices: torch.Tensor  # (Q, k) reference indices, nearest first
    distances: torch.Tensor  # (Q, k)
    certified: list[bool | None]  # per query; None when the metric's bound does not hold
    exact_distances: int  # how many exact distances were computed
    candidates: int
    mode: str
    stats: dict = field(default_factory=dict)


def embeddings(bank: ImageBank, metric, batch: int, progress: Callable[[int], None] | None = None,
               rows: range | None = None) -> torch.Tensor:
    """(N, E) embeddings of every image of the bank (or of `rows`, batches starting at rows.start), in batches."""
    rows = range(len(bank)) if rows is None else rows
    parts = []
    for start in range(rows.start, rows.stop, batch):
        idx = range(start, min(start + batch, rows.stop))
        e = metric.embed(metric.features(bank.get(idx))).double().cpu()
        e[bank.excluded(torch.as_tensor(idx))] = float("nan")  # an unreadable image has no embedding (and keeps none in the cache)
        parts.append(e)
        if progress is not None:
            progress(len(idx))
    return torch.cat(parts) if parts else torch.empty(0, 0, dtype=torch.float64)


def top_candidates(eq: torch.Tensor, er: torch.Tensor, m: int, block: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """The m smallest squared embedding distances of each query over the reference, blockwise.

    eq (Q, E), er (R, E) -> values (Q, m) ascending and reference indices (Q, m). A NaN row of er
    (an unreadable image) is at infinite distance.
    """
    q_norm = (eq * eq).sum(1, keepdim=True)
    best_d = torch.empty(eq.shape[0], 0, dtype=eq.dtype)
    best_i = torch.empty(eq.shape[0], 0, dtype=torch.long)
    for start in range(0, er.shape[0], block):
        rb = er[start : start + block]
        d = (q_norm + (rb * rb).sum(1) - 2 * eq @ rb.T).clamp_min_(0)  # (Q, B)
        d.masked_fill_(torch.isnan(rb).any(1), float("inf"))
        idx = torch.arange(start, start + rb.shape[0]).expand(eq.shape[0], -1)
        best_d, order = torch.cat([best_d, d], 1).sort(1)
        best_i = torch.cat([best_i, idx], 1).gather(1, order)
        best_d, best_i = best_d[:, :m], best_i[:, :m]
    return best_d, best_i


def search(
    queries: torch.Tensor,
    bank: ImageBank,
    metric,
    k: int = 5,
    candidates: int = 64,
    exact: bool = False,
    batch: int = 64,
    reference_embeddings: torch.Tensor | None = None,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    reference_rows: range | None = None,
) -> SearchResult:
    """The k nearest reference images of each query (Q, 3, H, W) in [-1, 1]. `exact` with
    `reference_rows`: the k nearest among those rows (a rank's share; `merge_nearest` joins the shares)."""
    n_ref, n_q = len(bank), queries.shape[0]
    k = min(k, n_ref)
    q_feats = metric.features(queries)
    if exact:
        return _brute_force(q_feats, bank, metric, k, batch, progress, range(n_ref) if reference_rows is None else reference_rows)
    m = min(max(candidates, k), n_ref)
    if reference_embeddings is None:
        reference_embeddings = embeddings(bank, metric, batch, progress("embed reference", n_ref) if progress else None)
    bounds, cand = top_candidates(metric.embed(q_feats).double().cpu(), reference_embeddings, min(m + 1, n_ref))
    advance = progress("exact distances", n_q) if progress else None
    chunk = rerank_group(m)
    out_i, out_d = [], []
    for start in range(0, n_q, chunk):
        qs = slice(start, min(start + chunk, n_q))
        idx = cand[qs, :m]  # (q, m)
        c_feats = metric.features(bank.get(idx.flatten().tolist()))
        c_feats = [f.view(*idx.shape, *f.shape[1:]) for f in c_feats]  # (q, m, ...)
        d = metric.paired_distances([f[qs] for f in q_feats], c_feats).cpu()  # (q, m)
        d[bank.excluded(idx)] = float("inf")  # found unreadable only now (damaged after its embedding was cached)
        best_d, order = d.sort(1)
        out_i.append(idx.gather(1, order[:, :k]))
        out_d.append(best_d[:, :k])
        if advance is not None:
            advance(idx.shape[0])
    indices, distances = torch.cat(out_i), torch.cat(out_d)
    if not getattr(metric, "bound_holds", True):
        certified = [None] * n_q
    elif m >= n_ref:
        certified = [True] * n_q
    else:  # every image left out is at least as far as the best bound left out
        certified = (distances[:, k - 1] <= bounds[:, m]).tolist()
    return SearchResult(indices, distances, certified, n_q * m, m, "two-stage")


def _brute_force(q_feats, bank: ImageBank, metric, k: int, batch: int, progress, rows: range) -> SearchResult:
    n_q = q_feats[0].shape[0]
    best_d = torch.full((n_q, 0), float("inf"), dtype=torch.float64)
    best_i = torch.empty((n_q, 0), dtype=torch.long)
    advance = progress("exact distances", len(rows)) if progress else None
    for start in range(rows.start, rows.stop, batch):
        idx = torch.arange(start, min(start + batch, rows.stop))
        r_feats = metric.features(bank.get(idx.tolist()))
        d = metric.cross_distances(q_feats, r_feats).cpu().double()  # (Q, B)
        d[:, bank.excluded(idx)] = float("inf")
        best_d, best_i = _nearest(torch.cat([best_d, d], 1), torch.cat([best_i, idx.expand(n_q, -1)], 1), k)
        if advance is not None:
            advance(len(idx))
    return SearchResult(best_i, best_d, [True] * n_q, n_q * len(rows), len(bank), "exact")


def _nearest(distances: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest (Q, N) distances per row, with their indices. Stable: of equal distances the one
    met first -- the lower reference index -- comes first, however the reference was split."""
    best_d, order = distances.sort(dim=1, stable=True)
    return best_d[:, :k], indices.gather(1, order[:, :k])


def merge_nearest(parts: list[SearchResult], k: int) -> SearchResult:
    """One exact search from searches of reference blocks in index order (the ranks' shares)."""
    distances, indices = _nearest(torch.cat([p.distances for p in parts], 1), torch.cat([p.indices for p in parts], 1), k)
    first = parts[0]
    return SearchResult(indices, distances, first.certified, sum(p.exact_distances for p in parts), first.candidates, first.mode)


def embedding_cache_key(metric, fingerprint: str, n: int, weight_shas: Sequence[str] = ()) -> str:
    text = f"{metric.describe()}|{getattr(metric, 'grid', '')}|{fingerprint}|{n}|{','.join(weight_shas)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_embeddings(path: Path, bank: ImageBank, metric, batch: int, progress=None, rt: Runtime | None = None) -> torch.Tensor:
    """The reference embeddings from `path`, else computed and stored there. The NaN rows of a cached
    file (images unreadable then) are decoded again: still unreadable, they are named in
    `bank.unreadable`; readable now, the embeddings are computed afresh. Under torchrun (`rt`) each
    rank embeds a block of whole batches, every rank gets them all, and rank 0 alone stores them."""
    emb = None
    if path.is_file():
        emb = torch.from_numpy(np.load(path))
        if not all(bank.decode(i) is None for i in torch.isnan(emb).any(1).nonzero().flatten().tolist()):
            emb = None
    if everywhere(rt, emb is not None):  # one decision for all ranks: they meet in the same gathers
        return emb
    rows = batch_block(len(bank), batch, rt)
    parts = gather(rt, lambda: (embeddings(bank, metric, batch, progress, rows), bank.unreadable))
    if progress is not None:
        progress(len(bank) - len(rows))  # the other ranks' images
    for _, unreadable in parts:
        bank.unreadable.update(unreadable)  # every rank knows every unreadable image, not only its own block's
    emb = torch.cat([e for e, _ in parts if e.shape[0]])
    if rt is None or rt.is_main:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")  # parallel runs on one cache never share it
            np.save(tmp, emb.numpy())
            tmp.replace(path)
        except OSError:
            pass
    return emb


def contact_sheet(rows: list[list[torch.Tensor]], gap: int = 2):
    """Rows of (3, H, W) images in [-1, 1] -> one PIL image; every cell resized to the first image's size."""
    from PIL import Image

    h, w = rows[0][0].shape[-2:]
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * (w + gap) - gap, len(rows) * (h + gap) - gap), "white")
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            if img.shape[-2:] != (h, w):
                img = F.interpolate(img[None], size=(h, w), mode="area")[0]
            array = to_uint8(img).permute(1, 2, 0).cpu().numpy()
            sheet.paste(Image.fromarray(array), (x * (w + gap), y * (h + gap)))
    return sheet


def named_unreadable(bank: ImageBank) -> dict[str, str]:
    """The bank's unreadable files so far, in file order: name -> "PATH: reason"."""
    return {bank.files[i].name: bank.unreadable[i] for i in sorted(bank.unreadable)}


def readable_queries(samples) -> tuple[ImageBank, list[int], dict]:
    """Every sample decoded once: the bank, the indices of the readable ones and the `unreadable` record."""
    from brics_cli.eval.image_sets import unreadable_report

    bank = ImageBank(samples.files)
    for start in range(0, len(bank), QUERY_CHUNK):  # in chunks: memory stays bounded whatever --limit is
        bank.get(range(start, min(start + QUERY_CHUNK, len(bank))))
    record = unreadable_report("samples", len(bank), named_unreadable(bank), samples.repair_hint())
    return bank, [i for i in range(len(bank)) if i not in bank.unreadable], record


def _search_shares(query_bank: ImageBank, queries: list[int], bank: ImageBank, distance, k: int, candidates: int, exact: bool,
                   batch: int, emb: torch.Tensor | None, progress, rt: Runtime | None) -> list[SearchResult]:
    """Every query's search, on every rank, the work split over ranks in units one process uses too:
    brute force by blocks of `batch` reference images (a rank scans its blocks for every query; the
    blocks' k nearest are merged), two-stage by groups of queries re-ranked together."""
    if exact:
        chunks = [queries[s : s + QUERY_CHUNK] for s in range(0, len(queries), QUERY_CHUNK)]
        rows = batch_block(len(bank), batch, rt)
        advance = progress("exact distances", len(rows) * len(chunks)) if progress else None
        shares = gather(rt, lambda: [search(query_bank.get(c), bank, distance, k, exact=True, batch=batch, reference_rows=rows,
                                            progress=advance and (lambda label, total: advance)) for c in chunks])
        return [merge_nearest([share[i] for share in shares], k) for i in range(len(chunks))]
    size = rerank_group(min(max(candidates, k), len(bank)))
    groups = [queries[s : s + size] for s in range(0, len(queries), size)]
    mine = batch_block(len(groups), 1, rt)
    advance = progress("exact distances", sum(len(groups[g]) for g in mine)) if progress else None
    shares = gather(rt, lambda: [search(query_bank.get(groups[g]), bank, distance, k, candidates, False, batch, emb,
                                        progress=advance and (lambda label, total: advance)) for g in mine])
    return [result for share in shares for result in share]


def find_neighbours(samples, reference, metric: str, *, k: int = 5, candidates: int = 64, exact: bool = False,
                    batch: int = 64, device: torch.device = torch.device("cpu"), grid_rows: int = 16, progress=None,
                    rt: Runtime | None = None):
    """`brics nn-search`: (nn.json report, contact sheet) for the samples against the reference (`ImageSet`s).
    Under torchrun (`rt`) the ranks share the embedding and the exact distances; None on ranks other than 0."""
    from brics_cli.errors import ConfigError
    from brics_cli.nets import weights
    from brics_cli.eval.image_sets import cache_root, unreadable_report

    if metric == "lpips":
        from brics_cli.nets.perceptual import load_lpips

        distance = LPIPSDistance(load_lpips("alex", device))
    else:
        distance = L2Distance()
    query_bank, queries, unreadable_samples = readable_queries(samples)  # refused here, before the reference is read
    bank = ImageBank(reference.files)
    if query_bank.shape != bank.shape:
        raise ConfigError(f"samples are {query_bank.shape[-2:]} and reference images {bank.shape[-2:]}: sizes must match")
    weight_names = weights.LPIPS_WEIGHTS["alex"] if metric == "lpips" else ()
    emb = None
    if not exact:
        key = embedding_cache_key(distance, reference.fingerprint, len(bank), [weights.describe(w)["sha256"] for w in weight_names])
        emb = cached_embeddings(cache_root() / "nn" / f"embed-{metric}-{key}.npy", bank, distance, batch,
                                progress("embed reference", len(bank)) if progress else None, rt)
    results = _search_shares(query_bank, queries, bank, distance, k, candidates, exact, batch, emb, progress, rt)
    for part in gather(rt, lambda: bank.unreadable):
        bank.unreadable.update(part)  # found by other ranks in their blocks
    unreadable = {"samples": unreadable_samples,
                  "reference": unreadable_report("reference images", len(bank), named_unreadable(bank), reference.repair_hint())}
    if rt is not None and not rt.is_main:
        return None
    n_q = len(queries)
    indices = torch.cat([r.indices for r in results])
    distances = torch.cat([r.distances for r in results])
    certified = [c for r in results for c in r.certified]
    keys = [p.stem for p in reference.files]
    # An unreadable reference image is never a neighbour; it could only fill a row when k exceeds the readable ones.
    neighbours = [[(i, float(d)) for i, d in zip(indices[q].tolist(), distances[q]) if i not in bank.unreadable] for q in range(n_q)]
    report = {
        "metric": metric,
        "k": int(indices.shape[1]),
        "queries": [
            {"sample": samples.files[queries[q]].name,
             "neighbours": [{"key": keys[i], "distance": d} for i, d in neighbours[q]],
             "certified": certified[q]}
            for q in range(n_q)
        ],
        "search": {
            "mode": results[0].mode,
            "candidates": results[0].candidates,
            "exact_distances": sum(r.exact_distances for r in results),
            "brute_force_distances": n_q * len(bank),
            "certified": sum(bool(c) for c in certified),
            "distance": distance.describe(),
            "reference": {"path": str(reference.path), "source": reference.source, "split": reference.split,
                          "manifest_sha256": reference.manifest_sha256, "n": len(bank) - len(bank.unreadable)},
            "samples": str(samples.path),
            "unreadable": unreadable,
            "weights": [weights.describe(w) for w in weight_names],
            "device": str(device),
        },
    }
    rows = [[query_bank.get([queries[q]])[0]] + list(bank.get([i for i, _ in neighbours[q]])) for q in range(min(grid_rows, n_q))]
    return report, contact_sheet(rows)
