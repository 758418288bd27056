"""A retrieved transfer set against a random gallery subset of the same size, on the embedded default.

Why: retrieval is worth its cost only if the student distilled on the retrieved crops beats one distilled on as many
crops drawn at random from the same gallery, at the same budget (seed paper Table 3). The gallery mixes the task's
domain (Fashion-MNIST train images outside the labeled draw) with other real images (crops of the scikit-image /
scikit-learn photographs, scikit-learn's digits); the queries are the labeled images. Both manifests come from
``reinforce.retrieve`` (``query-balanced`` and ``random``, de-contaminated against the test split), then
``train.pipeline`` runs the task-oriented cell of ``train/recipes/comparison.yaml`` (lp teacher, build, distill,
finetune, full test split) on each.

Example:
    python benchmarks/retrieve_transfer.py --run-dir runs/retrieval --size 2000 --shots 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl
import yaml

from reinforce.retrieve.__main__ import main as retrieve_main
from reinforce.sources import open_source
from train.pipeline import main as pipeline_main
from train.recipe import RECIPES, read_recipe

GALLERY_PARTS = ("fashion-mnist:train?shots=25&seed=0&part=unlabeled&limit=2000", "photo-crops:4000@64",
                 "sklearn:digits")


def write_gallery(path: Path) -> str:
    """A manifest of every image of ``GALLERY_PARTS`` (their URIs load without the part's spec)."""
    uris = [uri for spec in GALLERY_PARTS for uri in open_source(spec).uris.tolist()]
    pl.DataFrame({"uri": uris}).write_parquet(path)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/retrieval")
    parser.add_argument("--size", type=int, default=2000, help="crops in each transfer set")
    parser.add_argument("--crops", type=int, default=2, help="crops per gallery image")
    parser.add_argument("--shots", type=int, default=10, help="labeled images per class (also the queries)")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    recipe = read_recipe(RECIPES / "comparison.yaml")  # edited, then checked by the pipeline
    gallery = write_gallery(run / "gallery.parquet")
    queries = f"{recipe['data']}?shots={args.shots}&seed={recipe['seeds'][0]}&part=labeled"
    sets = {}
    for strategy in ("query-balanced", "random"):
        out = run / f"{strategy}.parquet"
        retrieve_main(["--queries", queries, "--gallery", gallery, "--size", str(args.size), "--crops",
                       str(args.crops), "--strategy", strategy, "--exclude", recipe["test"], "--out", str(out)])
        frame = pl.read_parquet(out)
        domain = float(frame["uri"].str.starts_with("fashion-mnist:").mean())
        print(f"{strategy}: {len(frame)} crops, {domain:.1%} from Fashion-MNIST")
        sets[f"{strategy}-retrieved" if strategy != "random" else "random-subset"] = str(out.resolve())
    recipe["grid"] = {"shots": [args.shots], "transfer": list(sets), "method": ["task-oriented"],
                      "teacher_mode": ["lp"]}
    recipe["transfer_sets"] = sets
    recipe["distill"]["epochs"] = max(1, round(recipe["distill"]["epochs"] * 2000 / args.size))  # same steps
    recipe_path = run / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    status = pipeline_main([str(recipe_path), "--run-dir", str(run / "pipeline")])
    print(json.dumps({"recipe": str(recipe_path), "results": str(run / "pipeline" / "results.md")}))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
