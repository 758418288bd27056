"""The task-oriented pipeline end to end on real data, as a user runs it:

train.teacher (Lite0 ImageNet weights, linear probe on 10 labels/class) → reinforce.build over the
unlabeled rest of the split → train.distill on two DeepSpeed ranks (torchrun, gloo) with a resume
→ train.finetune on the labels → train.evaluate. The teacher is a 10-class Fashion-MNIST teacher,
so "the student learned the task from the store" is measured as top-1 agreement with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support import REPO, cli_env

from reinforce.augment import eval_view
from reinforce.build import BuildConfig, build
from reinforce.replay import open_replay
from reinforce.sources import open_source
from reinforce.teachers import create_teacher
from stores.store import open_store
from train.deepspeed_glue import default_config, load_config
from train.distill import DistillConfig, build_objective
from train.losses import create_loss, kl_divergence
from train.models import create_student, load_student

SAMPLES, BATCH, EPOCHS = 1024, 32, 6
STUDENT = "mobilenetv3_small_050"
LABELED = "fashion-mnist:train?shots=10&seed=0&part=labeled"


@pytest.fixture(scope="module")
def teacher(vfm_home):
    """A real few-shot teacher: Lite0 ImageNet backbone + linear probe on 100 Fashion-MNIST labels, 32 px."""
    from train.teacher import main as teacher_main

    teacher_main(["--backbone", "tf_efficientnet_lite0", "--weights", "embedded", "--data", "fashion-mnist:train",
                  "--shots", "10", "--mode", "lp", "--folds", "0", "--size", "32", "--name", "lp_lite0",
                  "--out-dir", str(vfm_home / "teachers")])
    return create_teacher(str(vfm_home / "teachers" / "lp_lite0"))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, teacher) -> Path:
    out = tmp_path_factory.mktemp("distill") / "store"
    transfer = f"fashion-mnist:train?shots=10&seed=0&part=unlabeled&limit={SAMPLES}"
    config = BuildConfig(teacher="lp_lite0", transfer_set=transfer, out=str(out), views=2, topk=5, workers=0,
                         targets=("logits", "embedding", "patch"), unit_samples=512, device="cpu",
                         policy_args={"scale": [0.7, 1.0], "num_ops": 0})  # mild views for a short run
    build(config, teacher=teacher)
    return out


def _distill(store: Path, out: Path, epochs: int, *extra: str, nproc: int = 2,
             launcher: str = "torchrun") -> subprocess.CompletedProcess:
    env = cli_env()
    args = ["--store", str(store), "--student", STUDENT, "--size", "32", "--epochs", str(epochs),
            "--temperature", "1", "--batch-size", str(BATCH), "--lr", "5e-3", "--workers", "0", "--out", str(out),
            "--targets", "logits",
            *extra]
    if launcher == "deepspeed":  # passes --local_rank=N to every rank's command line
        launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_accelerators", str(nproc), "--module"]
    else:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m"]
                    if nproc > 1 else [sys.executable, "-m"])
    return subprocess.run([*launcher, "train.distill", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def distilled(store_dir, tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """One epoch, then a rerun asking for EPOCHS on the same --out with --resume (must continue, not restart)."""
    out = tmp_path_factory.mktemp("run") / "student"
    first = _distill(store_dir, out, 1)
    assert first.returncode == 0, first.stderr[-3000:]
    first_samples = [np.load(out / f"rank{r}_samples.npy") for r in range(2)]
    second = _distill(store_dir, out, EPOCHS, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    return out, [first, second], first_samples


def test_ranks_split_the_store(store_dir, distilled):
    _, _, first_samples = distilled
    ok = set(open_store(store_dir).samples.filter(status="ok")["index"].to_list())
    rank0, rank1 = (set(s[0].tolist()) for s in first_samples)
    assert len(first_samples[0][0]) == len(first_samples[1][0])  # equal batches per rank, no hang
    assert not rank0 & rank1
    assert rank0 | rank1 <= ok
    per_rank = len(ok) // 2 // BATCH * BATCH
    assert len(rank0) == len(rank1) == per_rank  # everything but the drop_last remainder
    assert len(ok) - len(rank0 | rank1) < 2 * BATCH + 2


def test_deepspeed_launcher_runs_distill(store_dir, tmp_path):
    out = tmp_path / "student"
    run = _distill(store_dir, out, 1, launcher="deepspeed")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    rank0, rank1 = (np.load(out / f"rank{r}_samples.npy") for r in range(2))
    assert rank0.shape == rank1.shape == (1, SAMPLES // 2 // BATCH * BATCH) and not set(rank0[0]) & set(rank1[0])
    assert json.loads((out / "student.json").read_text())["history"][-1]["world_size"] == 2


def test_resume_restores_weights_and_optimizer_state(store_dir, tmp_path):
    """1 epoch, then a rerun to 2 epochs, ends with the same weights, bit for bit, as 2 epochs in one run (the
    schedule's length fixed in the DeepSpeed config, so it does not depend on --epochs): the checkpoint restored
    the weights, the AdamW moments, the schedule position and the data order, on 2 ranks kept in sync."""
    steps = 2 * (SAMPLES // 2 // BATCH)
    config = default_config(cuda=False)
    config["scheduler"]["params"].update(total_num_steps=steps, warmup_num_steps=steps // 8)
    (tmp_path / "ds.json").write_text(json.dumps(config))
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    for out, epochs, extra in ((resumed, 1, ()), (resumed, 2, ("--resume",)), (straight, 2, ())):
        run = _distill(store_dir, out, epochs, "--deepspeed", str(tmp_path / "ds.json"), *extra)
        assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((resumed / "student.json").read_text())["history"][-1]["resumed_from"]["epoch"] == 1
    final = [load_file(str(out / "model.safetensors")) for out in (resumed, straight)]
    assert final[0].keys() == final[1].keys()
    for name in final[0]:
        assert torch.equal(final[0][name], final[1][name]), f"{name} differs after resume"
    assert (resumed / "log.jsonl").read_text() == (straight / "log.jsonl").read_text()


def test_resume_continues(distilled):
    out, _, _ = distilled
    steps_per_epoch = SAMPLES // 2 // BATCH
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == list(range(1, EPOCHS + 1))
    assert [row["step"] for row in log] == [steps_per_epoch * e for e in range(1, EPOCHS + 1)]
    stage = json.loads((out / "student.json").read_text())["history"][-1]
    assert stage["stage"] == "distill" and stage["epochs"] == EPOCHS
    assert stage["resumed_from"] == {"epoch": 1, "step": steps_per_epoch}
    assert stage["steps"] == steps_per_epoch * EPOCHS
    assert np.load(out / "rank0_samples.npy").shape == (EPOCHS - 1, steps_per_epoch * BATCH)
    assert [p.name for p in (out / "checkpoints").glob("global_step*")] == [f"global_step{steps_per_epoch * EPOCHS}"]
    written = load_config(out / "deepspeed.json")  # the default config, written out for the user to edit
    assert written["train_micro_batch_size_per_gpu"] == "auto" and "optimizer" in written


def test_student_agrees_with_teacher(distilled, teacher):
    """Held-out test images, eval views: the distilled student picks the teacher's class far above chance."""
    out, _, _ = distilled
    model, card = teacher
    student, student_card = load_student(out)
    held_out = open_source("fashion-mnist:test?limit=512")
    images = [held_out.load(i) for i in range(len(held_out))]
    with torch.inference_mode():
        teacher_top1 = model(torch.stack([eval_view(x, card.input_size) for x in images])).argmax(1)
        student_top1 = student.eval()(torch.stack([eval_view(x, student_card.input_size) for x in images])).argmax(1)
    agreement = (student_top1 == teacher_top1).float().mean().item()
    majority = np.bincount(teacher_top1.numpy()).max() / len(images)
    print(f"student/teacher top-1 agreement {agreement:.3f} (majority class {majority:.3f}, chance 0.100)")
    assert agreement > max(0.4, majority + 0.25)


def test_finetune_and_evaluate_the_distilled_student(distilled, tmp_path):
    """The last two stages through their command lines; the result is a usable 10-class classifier."""
    out, _, _ = distilled
    finetuned, report = tmp_path / "student", tmp_path / "eval.json"
    env = cli_env()
    for command in (["train.finetune", "--init", str(out), "--data", LABELED, "--steps", "30", "--batch-size", "50",
                     "--out", str(finetuned)],
                    ["train.evaluate", "--model", str(finetuned), "--data", "fashion-mnist:test?limit=500",
                     "--out", str(report)]):
        run = subprocess.run([sys.executable, "-m", *command], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads(report.read_text())
    history = [stage["stage"] for stage in json.loads((finetuned / "student.json").read_text())["history"]]
    assert history[0] == "distill" and len(history) == 2
    assert metrics["top1"] > 0.4 and 0.4 < metrics["balanced_accuracy"] <= 1.0


def test_replay_reads_only_the_distilled_targets(store_dir):
    """The reader train.distill iterates: views at the student's size, only the asked targets, decodable."""
    replay = open_replay(store_dir, targets=["embedding"], size=32)
    batch = replay.__getitems__([0, 3, 5])
    assert batch["views"].shape == (3, 3, 32, 32) and batch["views"].dtype == torch.uint8
    assert batch["index"].tolist() == [0, 3, 5] and set(batch["targets"]) == {"embedding"}
    assert replay.decode(batch["targets"])["embedding"].shape == (3, 1280)
    first = replay.view_of.copy()
    replay.set_epoch(0)
    assert (replay.view_of == first).all()  # the view choice is a function of (seed, epoch, sample)


def test_replay_of_the_first_views_and_fresh_online_views(store_dir):
    """--views 1 replays only view 0 of a 2-view store; online views are drawn as the build draws, never stored."""
    replay = open_replay(store_dir, targets=["logits"], size=32, views=1)
    for epoch in range(3):
        replay.set_epoch(epoch)
        assert (replay.__getitems__(list(range(64)))["view"] == 0).all()
    with pytest.raises(ValueError, match="holds 2 views"):
        open_replay(store_dir, views=3)
    online = open_replay(store_dir, targets=["logits"], size=32, online=True)
    online.set_epoch(1)
    batch = online.__getitems__([0, 7])
    assert batch["targets"] == {} and batch["view"].tolist() == [3, 3]  # K + epoch: a view no build stored
    manifest, policy = online.store.manifest, online.policy
    image = online.source.load(7)
    theta = policy.sample(manifest.content.seed, 7, 3, image.shape[-2], image.shape[-1])
    assert torch.equal(batch["teacher_views"][1], policy.apply(image, theta))  # at the teacher's size
    assert torch.equal(batch["views"][1], policy.apply(image, theta, size=32))


def test_online_distillation_runs_the_stores_teacher(store_dir, teacher, tmp_path):
    """--online: the teacher in the loop (one process; found in the zoo by the store's teacher name), recorded in the
    student card; another teacher is refused."""
    run = _distill(store_dir, tmp_path / "online", 1, "--online", nproc=1)
    assert run.returncode == 0, run.stderr[-3000:]
    stage = json.loads((tmp_path / "online" / "student.json").read_text())["history"][-1]
    assert stage["online"] is True and stage["steps"] == SAMPLES // BATCH
    from train.teacher import main as teacher_main

    teacher_main(["--backbone", "tf_efficientnet_lite0", "--data", "fashion-mnist:train", "--shots", "2",
                  "--mode", "lp", "--folds", "0", "--size", "32", "--lp-steps", "2", "--name", "other",
                  "--out-dir", str(tmp_path / "teachers")])
    refused = _distill(store_dir, tmp_path / "refused", 1, "--online", "--teacher", str(tmp_path / "teachers/other"),
                       nproc=1)
    assert refused.returncode == 2 and "is not the teacher of store" in refused.stderr


@pytest.mark.parametrize("target", ["logits", "embedding", "patch", "logits,embedding:0.5"])
def test_each_loss_decreases_on_a_real_store(store_dir, target):
    """The objective train.distill builds for each target kind (KL, contrastive with projections, cosine
    with a 1x1 projection) goes down over a few steps on one real replayed batch."""
    names = tuple(t.partition(":")[0] for t in target.split(","))
    config = DistillConfig(store=str(store_dir), student=STUDENT, out="unused", targets=names,
                           weights={"embedding": 0.5} if "," in target else {})
    replay = open_replay(store_dir, targets=names, size=32)
    torch.manual_seed(0)
    student, _ = create_student(STUDENT, class_names=tuple(str(i) for i in range(10)) if "logits" in names else (),
                                input_size=32)
    objective = build_objective(student, replay, config)
    batch = replay.__getitems__(list(range(32)))
    targets = replay.decode(batch["targets"])
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, parts = objective(batch["views"], targets)
        assert set(parts) == set(names)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"{target}: {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.9 * losses[0]


def test_kl_is_zero_on_equal_logits():
    logits = torch.randn(4, 10)
    assert kl_divergence(logits, logits, 2.0).abs().item() < 1e-5
    assert kl_divergence(torch.zeros(4, 10), logits, 2.0).item() > 0
    assert kl_divergence(logits, torch.log_softmax(logits, -1), 2.0).abs().item() < 1e-5  # shift invariant


def test_kl_is_teacher_to_student_times_t_squared():
    """``KL(p_teacher ‖ p_student)`` (mass where the teacher puts it), scaled by T² so gradients keep their size."""
    student, teacher = torch.randn(6, 10), 3 * torch.randn(6, 10)
    for temperature in (1.0, 2.0, 4.0):
        p_s, p_t = (torch.softmax(x / temperature, -1) for x in (student, teacher))
        forward = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
        reverse = (p_s * (p_s.log() - p_t.log())).sum(-1).mean()
        got = kl_divergence(student, teacher, temperature)
        torch.testing.assert_close(got, temperature**2 * forward)
        assert not torch.isclose(got, temperature**2 * reverse, rtol=1e-2)


@pytest.mark.parametrize("case", ["missing_store", "unknown_student", "fingerprint", "unknown_target", "wrong_loss"])
def test_errors_are_one_line(case, store_dir, tmp_path):
    store, student, extra = store_dir, STUDENT, []
    if case == "missing_store":
        store = tmp_path / "nope"
    elif case == "unknown_student":
        student = "no_such_net_123"
    elif case == "unknown_target":
        extra = ["--targets", "seg_logits"]
    elif case == "wrong_loss":
        extra = ["--targets", "embedding", "--loss", "cosine"]
    else:
        store = tmp_path / "store"
        subprocess.run(["cp", "-r", str(store_dir), str(store)], check=True)
        manifest = json.loads((store / "manifest.json").read_text())
        manifest["content"]["transfer_set"]["fingerprint"] = "0" * 64
        (store / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "-m", "train.distill", "--store", str(store), "--student", student,
                             "--out", str(tmp_path / "out"), *extra], cwd=REPO, capture_output=True, text=True,
                            env=cli_env(), timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.distill: error:")]
    assert len(lines) == 1, result.stderr[-2000:]


def test_finetune_rejects_data_with_other_classes(distilled, photo_dir, tmp_path, capsys):
    """The distilled student carries the store's 10 teacher classes; 2-class data is refused in one line."""
    from train.finetune import main as finetune_main

    for label, names in (("cats", ("chelsea",)), ("things", ("coffee", "rocket"))):
        (tmp_path / "two" / label).mkdir(parents=True)
        for name in names:
            (tmp_path / "two" / label / f"{name}.png").write_bytes((photo_dir / f"{name}.png").read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(["--init", str(distilled[0]), "--data", f"imagefolder:{tmp_path / 'two'}", "--shots", "0",
                       "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.startswith("train.finetune: error: ") and "10 classes" in err and "has 2" in err
    assert not (tmp_path / "never").exists()


def test_sampled_ce_has_the_kl_gradient_in_expectation():
    """Cross-entropy against empirical targets (``sampled_logits`` draws) is linear in the target, so its gradient
    averaged over draws is the gradient against the draws' mean, which tends to the teacher's: the KL gradient."""
    from stores.codecs import SampledLogitsCodec

    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(16, 10, generator=generator) * 2, torch.randn(16, 10, generator=generator)
    codec = SampledLogitsCodec(samples=32, num_classes=10, temperature=2.0)
    keys = np.stack([np.zeros(16), np.arange(16), np.zeros(16)], 1).astype(np.int64)
    grads = {}
    for name, target in (("kl", teacher), ("sampled_ce", None)):
        loss = create_loss(name, temperature=2.0)
        x = student.clone().requires_grad_(True)
        if target is None:  # 500 draws of 32 per view, keyed apart
            draws = [codec.round_trip(teacher, np.c_[np.full(16, seed), keys[:, 1:]]) for seed in range(500)]
            target = torch.stack(draws).mean(0)
        loss(x, target).backward()
        grads[name] = x.grad
    torch.testing.assert_close(grads["sampled_ce"], grads["kl"], atol=2e-3, rtol=0)
