"""Top-k vs sampled teacher targets vs fp16 full logits, side by side in one run, at equal bytes per view.

Why: a top-k cache truncates the teacher's distribution, so its decoded target is biased (the tail is a guess);
``sampled_logits`` stores class ids drawn from the teacher (Anshumann et al., ACL 2025) and is unbiased. This
measures both claims with the CLIs a user runs:

(a) 1000 classes, fidelity only: the real Lite0 ImageNet teacher (64 px) on ``photo-crops`` (real photographs
    from scikit-image and friends, seeded crops). One ``reinforce.build`` per codec: top-k k = 1, 3, 5, 10
    (uint8), sampled N draws (N around the top-k sizes) and fp16 full logits (k = 1000, the reference). Per store:
    bytes/view of the targets and with θ (``stores inspect``'s numbers), build seconds per 1000 views and the codec's
    own encode time per view, per-view total variation to the teacher, KL(teacher ‖ decoded) (top-k; infinite for
    an empirical target), and the bias: the decoded targets averaged over all views against the teacher's average,
    as KL and as chi² per degree of freedom of the pooled counts (N draws per view; top-k: N x its decoded target
    as pseudo-counts). Unbiased draws give chi²/dof ≈ 1 (a bit below: draws within a view are multinomial).
(b) the default task (Fashion-MNIST, the recipe's ft Lite0 teacher on 10 labels per class, student
    ``mobilenetv3_small_050`` at 32 px): one store per target, students distilled with ``--loss auto`` (kl for
    top-k and fp16 at T = 2; sampled_ce for sampled, drawn at T = 2) for ``--seeds`` distillation seeds (student
    initialisation, batch order, view choice; store and teacher shared) and scored on the full test split before
    finetuning: top-1, ECE (15 equal-width bins), NLL, Brier. Sized for a loaded 2-core CPU (``--transfer-limit``
    images, ``--epochs``), smaller than the recipe's 10k images x 13 epochs.

Writes ``OUT/targets_e{epochs}.json`` and ``OUT/reliability_targets_e{epochs}.png`` and prints the tables
(docs/targets.md quotes them).

Example:
    python benchmarks/targets.py --out docs --work runs/targets --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stores.codecs import bias_z2_per_dof, create_codec
from stores.store import open_store
from stores.verify import describe_store
from train.calibration import pool_bins
from train.plots import plot_reliability

FMNIST = "fashion-mnist:train"
TEACHER = ["--backbone", "tf_efficientnet_lite0", "--library", "timm", "--weights", "embedded", "--size", "64",
           "--lp-steps", "300", "--lp-views", "4", "--steps", "100", "--baseline-student", "none"]
STUDENT = ["--student", "mobilenetv3_small_050", "--size", "32", "--batch-size", "128", "--lr", "0.005",
           "--workers", "0"]


def run(module: str, *argv: str, threads: int) -> float:
    """``python -m module argv`` with ``threads`` torch threads; returns its wall seconds (raises on failure)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{module} {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def build(name: str, work: Path, teacher: str, transfer: str, codec: list[str], threads: int,
          views: int = 4, policy: list[str] = ()) -> dict[str, Any]:
    """One ``reinforce.build`` (skipped when the store exists; its wall seconds kept beside it in NAME.seconds):
    its bytes and seconds per 1000 views."""
    out = work / "stores" / name
    timing = out.with_name(f"{name}.seconds")
    if not (out / "manifest.json").exists():
        seconds = run("reinforce.build", "--teacher", teacher, "--transfer-set", transfer, "--views", str(views),
                      "--targets", "logits", *codec, *policy, "--workers", "0", "--out", str(out), threads=threads)
        timing.write_text(f"{seconds}\n")
    seconds = float(timing.read_text()) if timing.exists() else None
    described = describe_store(out)
    total = described["samples_ok"] * described["views"]
    target = described["targets"]["logits"]
    return {"name": name, "store": str(out), "codec": target["codec"], "bytes_per_view": target["bytes_per_view"],
            "theta_bytes_per_view": described["theta_bytes_per_view"],
            "with_theta": target["bytes_per_view"] + described["theta_bytes_per_view"],
            "build_seconds_per_1k_views": seconds and 1000 * seconds / total, "fidelity": target["fidelity"]}


def decoded_targets(store_dir: str) -> torch.Tensor:
    """Every view's decoded target ``[N * K, C]`` (probabilities for sampled, log-probabilities otherwise)."""
    store = open_store(store_dir)
    samples = store.manifest.num_samples
    payload = store.read_range(0, samples)
    arrays = {a.split("/", 1)[1]: v.reshape(-1, *v.shape[2:]) for a, v in payload.items() if a.startswith("logits/")}
    return store.decode("logits", arrays)


def redrawn_bias(codec_record: dict[str, Any], log_p: torch.Tensor, redraws: int) -> float:
    """``bias_z2_per_dof`` over every view's target drawn ``redraws`` times (keys seeded 1..R, not the store's), from
    the fp16 store's teacher log-probabilities ``log_p [V, C]``: R x V views without R teacher passes. A top-k
    target is deterministic: its R copies are one decode R times."""
    codec = create_codec(**codec_record)
    sampled = codec.decoded == "empirical"
    keys = np.stack([np.zeros(len(log_p)), np.arange(len(log_p)), np.zeros(len(log_p))], 1).astype(np.int64)
    total = torch.zeros(log_p.shape[1], dtype=torch.float64)
    for r in range(redraws if sampled else 1):
        keys[:, 0] = r + 1
        decoded = codec.round_trip(log_p, keys)
        total += (decoded if sampled else decoded.exp() * redraws).double().sum(0)
    return bias_z2_per_dof(total, log_p.exp(), getattr(codec, "samples", 4), repeats=redraws)


def encode_seconds_per_view(codec_record: dict[str, Any], logits: torch.Tensor) -> float:
    """The codec's own encode time per view (the teacher's forward excluded), on ``logits [V, C]``."""
    codec = create_codec(**codec_record)
    keys = np.stack([np.zeros(len(logits)), np.arange(len(logits)), np.zeros(len(logits))], 1).astype(np.int64)
    codec.encode(logits[:64], keys[:64])  # warm-up
    started = time.perf_counter()
    codec.encode(logits, keys)
    return (time.perf_counter() - started) / len(logits)


def part_a(work: Path, crops: int, redraws: int, threads: int) -> dict[str, Any]:
    """1000-class fidelity, bytes and cost per view, and bias, for every codec (module docstring, (a))."""
    from reinforce.teachers import embedded_imagenet_teacher, save_teacher

    teacher = work / "teachers" / "lite0_in1k"
    if not (teacher / "teacher.json").exists():
        save_teacher(*embedded_imagenet_teacher(64), teacher)
    transfer, policy = f"photo-crops:{crops}@96", ["--policy", "rrc_flip"]
    rows = [build("fp16", work, str(teacher), transfer, ["--topk", "1000", "--logit-precision", "fp16"], threads,
                  policy=policy)]
    rows += [build(f"top{k}", work, str(teacher), transfer, ["--topk", str(k)], threads, policy=policy)
             for k in (1, 3, 5, 10)]
    rows += [build(f"sampled{n}", work, str(teacher), transfer, ["--codec", "sampled_logits", "--samples", str(n),
                                                                  "--sample-temperature", "1"], threads, policy=policy)
             for n in (2, 4, 8, 16, 32)]
    teacher_log_p = decoded_targets(rows[0]["store"])
    teacher_p = teacher_log_p.exp()
    for row in rows:
        decoded = decoded_targets(row["store"])
        sampled = row["codec"]["name"] == "sampled_logits"
        probs = decoded if sampled else decoded.exp()
        n = row["codec"].get("samples", 4)  # top-k: pseudo-counts at sampled's N = 4
        mean_p, mean_q = teacher_p.mean(0), probs.mean(0)
        row.update(views=len(probs), tv=float(0.5 * (probs - teacher_p).abs().sum(-1).mean()),
                   kl_per_view=None if sampled else float((teacher_p * (teacher_log_p - decoded)).sum(-1).mean()),
                   bias_tv=float(0.5 * (mean_p - mean_q).abs().sum()),
                   z2_per_dof=bias_z2_per_dof(probs.sum(0), teacher_p, n),
                   z2_per_dof_redrawn=redrawn_bias(row["codec"], teacher_log_p, redraws),
                   encode_us_per_view=1e6 * encode_seconds_per_view(row["codec"], teacher_log_p[:2048]))
    return {"transfer_set": transfer, "policy": "rrc_flip", "redraws": redraws,
            "teacher": "Lite0 ImageNet-1k (embedded weights), 64 px", "rows": rows}


def part_b(work: Path, limit: int, epochs: int, seeds: list[int], samples: list[int],
           threads: int) -> dict[str, Any]:
    """The default task: students distilled from top-5, sampled at equal bytes and fp16 (module docstring, (b))."""
    teacher = work / "teachers" / "ft_lite0"
    if not (teacher / "teacher.json").exists():
        run("train.teacher", *TEACHER, "--data", FMNIST, "--shots", "10", "--mode", "ft", "--name", "ft_lite0",
            "--out-dir", str(teacher.parent), threads=threads)
    transfer = f"{FMNIST}?shots=10&seed=0&part=unlabeled&limit={limit}"
    policy = ["--policy", "rrc_flip", "--policy-arg", "scale=[0.35,1.0]"]
    top5 = build("fm_top5", work, str(teacher), transfer, ["--topk", "5"], threads, policy=policy)
    fp16 = build("fm_fp16", work, str(teacher), transfer, ["--topk", "10", "--logit-precision", "fp16"], threads,
                 policy=policy)
    candidates = [build(f"fm_sampled{n}", work, str(teacher), transfer,
                        ["--codec", "sampled_logits", "--samples", str(n), "--sample-temperature", "2"], threads,
                        policy=policy) for n in samples]
    sampled = min(candidates, key=lambda r: abs(r["bytes_per_view"] - top5["bytes_per_view"]))
    results = []
    for store in (top5, sampled, fp16):
        for seed in seeds:
            out = work / "students" / f"{store['name']}-e{epochs}-s{seed}"
            if not (out / "model.safetensors").exists():
                store.setdefault("distill_seconds", []).append(
                    run("train.distill", "--store", store["store"], *STUDENT, "--epochs", str(epochs), "--seed",
                        str(seed), "--temperature", "2", "--loss", "auto", "--out", str(out), threads=threads))
            evaluation = out / "test.json"
            if not evaluation.exists():
                run("train.evaluate", "--model", str(out), "--data", "fashion-mnist:test", "--out", str(evaluation),
                    threads=threads)
            metrics = json.loads(evaluation.read_text())
            results.append({"store": store["name"], "seed": seed, **{k: metrics[k] for k in
                                                                     ("top1", "ece", "nll", "brier", "reliability")}})
    steps = json.loads((work / "students" / f"fm_top5-e{epochs}-s{seeds[0]}" / "student.json").read_text())
    steps = steps["history"][-1]
    return {"transfer_set": transfer, "epochs": epochs, "steps": steps["steps"], "stores": [top5, sampled, fp16],
            "candidates": candidates, "students": results}


def _mean_std(values: list[float], scale: float = 100, digits: int = 1) -> str:
    text = f"{statistics.mean(values) * scale:.{digits}f}"
    return text + (f" ± {statistics.stdev(values) * scale:.{digits}f}" if len(values) > 1 else "")


def markdown(a: dict[str, Any], b: dict[str, Any]) -> str:
    lines = [f"## (a) 1000 classes: {a['teacher']} on `{a['transfer_set']}`", "",
             "| target | B/view | B/view with θ | TV per view | KL(teacher ‖ decoded) per view | TV(mean teacher, "
             f"mean decoded) | bias z²/dof, stored views | z²/dof, {a['redraws']} redraws per view | "
             "build s / 1k views | encode µs / view |", "| --- " + "| ---: " * 9 + "|"]
    for r in a["rows"]:
        kl = "∞ (omits classes)" if r["kl_per_view"] is None else f"{r['kl_per_view']:.3f}"
        build_s = "–" if r["build_seconds_per_1k_views"] is None else f"{r['build_seconds_per_1k_views']:.1f}"
        lines.append(f"| {r['name']} | {r['bytes_per_view']:.1f} | {r['with_theta']:.1f} | {r['tv']:.3f} | {kl} | "
                     f"{r['bias_tv']:.4f} | {r['z2_per_dof']:.2f} | {r['z2_per_dof_redrawn']:.2f} | {build_s} | "
                     f"{r['encode_us_per_view']:.1f} |")
    sampled = b["stores"][1]
    sizes = ", ".join(f"{c['codec']['samples']} ({c['bytes_per_view']:.1f} B)" for c in b["candidates"])
    lines += ["", f"## (b) Fashion-MNIST, `{b['transfer_set']}`, {b['epochs']} epochs ({b['steps']} steps of 128), "
              "no finetuning", "", f"sampled N = {sampled['codec']['samples']} (of {sizes}) matches top-5's bytes.",
              "",
              "| target | B/view | with θ | top-1 (%) | ECE (%) | NLL | Brier | seeds |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for store in b["stores"]:
        rows = [r for r in b["students"] if r["store"] == store["name"]]
        lines.append(f"| {store['name']} | {store['bytes_per_view']:.1f} | {store['with_theta']:.1f} | "
                     f"{_mean_std([r['top1'] for r in rows])} | {_mean_std([r['ece'] for r in rows])} | "
                     f"{_mean_std([r['nll'] for r in rows], 1, 3)} | {_mean_std([r['brier'] for r in rows], 1, 3)} "
                     f"| {len(rows)} |")
    return "\n".join(lines) + "\n"


def plot_reliability_targets(b: dict[str, Any], path: Path) -> None:
    """The students' reliability diagram, one line per target, bins pooled over seeds."""
    curves = {store["name"]: pool_bins([r["reliability"] for r in b["students"] if r["store"] == store["name"]])
              for store in b["stores"]}
    plot_reliability(curves, path, f"Fashion-MNIST test, {b['steps']} distillation steps, seeds pooled")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs", help="the json and the reliability diagram go here")
    parser.add_argument("--work", default="runs/targets", help="teachers, stores and students (reused on a rerun)")
    parser.add_argument("--crops", type=int, default=1024, help="(a): photo crops, 4 views each")
    parser.add_argument("--redraws", type=int, default=64, help="(a): targets redrawn per view for the bias test")
    parser.add_argument("--transfer-limit", type=int, default=2000, help="(b): unlabeled Fashion-MNIST images")
    parser.add_argument("--epochs", type=int, default=10, help="(b): distillation epochs")
    parser.add_argument("--seeds", default="0,1,2", help="(b): distillation seeds")
    parser.add_argument("--samples", default="32,64,128", help="(b): sampled N candidates (the closest to top-5's "
                                                                 "bytes is distilled)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    a = part_a(work, args.crops, args.redraws, args.threads)
    b = part_b(work, args.transfer_limit, args.epochs, [int(s) for s in args.seeds.split(",")],
               [int(n) for n in args.samples.split(",")], args.threads)
    result = {"a": a, "b": b, "seconds": round(time.perf_counter() - started, 1), "threads": args.threads}
    (out / f"targets_e{args.epochs}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_reliability_targets(b, out / f"reliability_targets_e{args.epochs}.png")
    print(markdown(a, b))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
