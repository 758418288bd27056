"""``python -m reinforce.retrieve``: curate a task-related transfer set from a gallery, using the few labeled task
images as queries (seed paper §3.4, Appendix B).

The gallery is any source; at crop level each image gives C RandomResizedCrop crops (scale 0.08-1) with RandAugment
(2 ops, magnitude 9: the build's ``rrc_flip_randaug``, B.2; ``--crop-augment none``: plain ``rrc_flip`` crops), each
a θ record, so a retrieved crop is (image, θ) and no pixels are stored: ``retrieved:OUT`` cuts each row by its own
policy (box, flip and ops at source resolution). Image-level views (queries, task images, the gallery images judged
for duplicates and leaks) are square centre crops resized bicubically (``rrc_flip_bicubic``, as OpenCLIP's resize),
so a bicubically resized or re-encoded copy of a small task image lands near its original. Every embedding (gallery
crops, gallery images, queries, task images) is a ``reinforce.build`` store with the ``embedding`` target only, named
by its store id under ``--cache`` (the id hashes the crop policy): retrieving again with other queries or sizes runs
no encoder over the gallery; an encoder whose stores disagree in width is refused in one line.
Similarity is the mean of the encoders' cosine similarities (B.2). Retrieved source images more similar than 0.99
to each other are duplicates (one kept per union-find group, B.3); those more similar than 0.95 to any ``--exclude``
task image under any encoder are possible leaks (B.4: removed unless ``--keep-leaks``, and listed in
``OUT.report.json`` with their 5 nearest task images for a visual check), as are those whose grayscale thumbnail
correlates above ``--near-copy-threshold`` with a task image (``nearcopy``: resized, re-encoded copies an
encoder misses; ``--no-near-copy`` skips it). Removed items are replaced by searching
again, so the manifest holds exactly ``--size`` crops (``--with-queries`` appends the query images, as the paper
does); ``reinforce.build --transfer-set OUT`` builds on the crops. ``--index flat`` is faiss's exact search, run as
``--index torch`` (exact blockwise matmul + top-k, fp16 with fp32 scores) where the encoders run on CUDA, since
PyPI's faiss has no kernels for current GPUs; with ``--index ivfpq`` the ``similarity`` column is IVF-PQ's
approximate score; duplicates and leaks are always judged by exact similarities.

Example:
    python -m reinforce.retrieve --queries "fashion-mnist:train?shots=10&part=labeled" --gallery photo-crops:20000 \
        --encoders embedded --size 5000 --crops 10 --exclude fashion-mnist:test --out runs/retrieved.parquet
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reinforce.retrieve.curate import CROP_AUGMENTS, LEVELS, RetrieveConfig, retrieve
from reinforce.retrieve.search import INDEX_KINDS, STRATEGIES
from stores.cli_errors import HelpFormatter, cli_errors, debug_flag
from stores.cli_logging import log_to_stderr

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> tuple[RetrieveConfig, bool]:
    """The retrieval's config and whether ``--debug`` was given."""
    parser = argparse.ArgumentParser(prog="python -m reinforce.retrieve", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    defaults = RetrieveConfig(queries="", gallery="", out="")
    parser.add_argument("--queries", required=True, help="source spec of the labeled task images (the query set)")
    parser.add_argument("--gallery", required=True, help="source spec of the gallery (see reinforce.sources)")
    parser.add_argument("--out", required=True, help="manifest to write (.parquet); the report goes to OUT.report.json")
    parser.add_argument("--encoders", default=",".join(defaults.encoders),
                        help="comma-separated teacher-zoo entries or 'embedded' (Lite0 ImageNet); similarity is the "
                             "mean of their cosine similarities")
    parser.add_argument("--size", type=int, default=defaults.size, help="crops to retrieve (N)")
    parser.add_argument("--crops", type=int, default=defaults.crops, help="RandomResizedCrop crops per gallery image")
    parser.add_argument("--level", choices=tuple(LEVELS), default=defaults.level,
                        help="crop: --crops crops per image (scale 0.08-1); image: one square centre crop per image")
    parser.add_argument("--crop-augment", choices=tuple(CROP_AUGMENTS), default=defaults.crop_augment,
                        help="randaug: RandAugment (2 ops, magnitude 9, the build's rrc_flip_randaug) on each gallery "
                             "crop, as the paper (B.2); none: the plain crop")
    parser.add_argument("--strategy", choices=STRATEGIES, default=defaults.strategy)
    parser.add_argument("--exclude", action="append", default=[], metavar="TASK_SRC",
                        help="task source (train, val, test; repeatable): gallery images near-copies of one are leaks")
    parser.add_argument("--keep-leaks", action="store_true", help="flag leaks in the manifest instead of removing them")
    parser.add_argument("--with-queries", action="store_true",
                        help="append the query images (centre crops) to the transfer set, as the paper does")
    parser.add_argument("--index", choices=INDEX_KINDS, default=defaults.index,
                        help="flat: exact inner product (faiss; on CUDA it runs as torch); ivfpq: approximate, for "
                             "large galleries; torch: exact blockwise matmul + top-k in torch (GPU, else CPU)")
    parser.add_argument("--nprobe", type=int, default=defaults.nprobe, help="IVF lists searched per query (ivfpq)")
    parser.add_argument("--duplicate-threshold", type=float, default=defaults.duplicate_threshold)
    parser.add_argument("--leak-threshold", type=float, default=defaults.leak_threshold,
                        help="a gallery image this similar (any encoder) to an --exclude image is a possible leak "
                             "(B.4); with the pixel check on, a leak once its pixels confirm it (--near-copy-confirm)")
    parser.add_argument("--near-copy-threshold", type=float, default=defaults.near_copy_threshold,
                        help="pixel-level leak check: a gallery image whose grayscale pixels correlate above this "
                             "with a (slightly cropped) --exclude image is a leak (nearcopy; chosen on validation "
                             "plants, docs/retrieval.md)")
    parser.add_argument("--near-copy-confirm", type=float, default=defaults.near_copy_confirm,
                        help="the pixel correlation that confirms a possible leak found by embedding similarity")
    parser.add_argument("--no-near-copy", dest="near_copy", action="store_false",
                        help="judge leaks by embedding similarity only")
    parser.add_argument("--cache", default=None, help="embedding stores (default: OUT's folder/retrieval-cache)")
    parser.add_argument("--encoder-size", type=int, default=defaults.encoder_size, help="input size of 'embedded'")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="encoder batch, in crops")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader decode/crop workers")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the crops and the random choices")
    args = vars(debug_flag(parser).parse_args(argv))
    debug = args.pop("debug")
    args["encoders"] = tuple(e.strip() for e in args["encoders"].split(",") if e.strip())
    args["exclude"] = tuple(args["exclude"])
    return RetrieveConfig(**args), debug


def main(argv: list[str] | None = None) -> int:
    log_to_stderr()
    config, debug = parse_args(argv)
    with cli_errors("reinforce.retrieve", debug):
        report = retrieve(config).report
    counts = report["per_query"]
    print(f"retrieved {report['size']} crops of {report['images']} gallery images into {config.out} "
          f"({config.strategy}, k={report['k']}, per-query {counts['min']}..{counts['max']}); "
          f"removed {report['duplicates_removed']} duplicate and {report['leaks_removed']} leaked images "
          f"({report['leaks_found']} leaks found, listed in {Path(config.out).with_suffix('.report.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
