"""Inputs from strangers and careless colleagues, through the command lines a user runs: one writer per store
(two real builds on one ``--out``, a lock left by a killed build), recipes and safetensors files that are
not what they claim, DeepSpeed checkpoints (pickle) that a run did not write itself. An input error is one
line and exit status 2; a bug keeps its traceback."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support import REPO, cli_env

from reinforce.build import main as build_main
from stores.cli_errors import _message, is_user_error
from stores.location import Location
from stores.lock import LOCK
from stores.store import StoreCorruptError, open_store
from train import evaluate, pipeline
from train.models import create_student, save_student

SPEC = "fashion-mnist:test?limit=64"
ENV = cli_env()


def run(module: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)


def one_line_error(result: subprocess.CompletedProcess, prog: str) -> str:
    """The single ``PROG: error: ...`` line, last on stderr, of a run that exited 2 without a traceback (what comes
    before it is logging, e.g. DeepSpeed's import-time warnings)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert result.returncode == 2 and errors == lines[-1:], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[-1]


def build_args(zoo: Path, out: Path) -> list[str]:
    return ["--teacher", str(zoo), "--transfer-set", SPEC, "--targets", "logits", "--views", "2", "--unit-samples",
            "16", "--chunk-samples", "8", "--batch-size", "32", "--workers", "0", "--out", str(out)]


def start_build_until_locked(zoo: Path, out: Path) -> subprocess.Popen:
    """A ``python -m reinforce.build`` process, returned as soon as it holds the store's lock."""
    process = subprocess.Popen([sys.executable, "-m", "reinforce.build", *build_args(zoo, out)], cwd=REPO, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = out.with_name(out.name + ".partial") / LOCK
    while process.poll() is None and not lock.exists():
        time.sleep(0.002)
    assert process.poll() is None, f"the build ended before it took the lock: {process.stderr.read()[-3000:]}"
    return process


def assert_published_clean(out: Path) -> None:
    """``out`` is published, verifies, and holds exactly its manifest's files: no lock, no partial store."""
    manifest = open_store(out).manifest
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {record.path for record in manifest.files} | {"manifest.json"}
    assert not out.with_name(out.name + ".partial").exists()
    assert run("stores", "verify", str(out)).returncode == 0


@pytest.mark.e2e
def test_a_second_build_on_one_out_is_refused_naming_the_owner(lite0_teacher, tmp_path):
    """Two real builds on one --out: while the first holds the lock (stopped mid-build, alive), the second exits 2
    in one line naming its pid; the first then publishes a store that verifies, with no stray file."""
    zoo, out = lite0_teacher[2], tmp_path / "store"
    first = start_build_until_locked(zoo, out)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = run("reinforce.build", *build_args(zoo, out))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    error = one_line_error(second, "reinforce.build")
    assert f"another build (pid {first.pid} on host" in error and "is writing this store" in error, error
    _, log = first.communicate(timeout=600)
    assert first.returncode == 0, log[-3000:]
    assert_published_clean(out)
    again = run("reinforce.build", *build_args(zoo, out))  # published: found, not rebuilt, no lock left behind
    assert again.returncode == 0 and "already built" in again.stderr, again.stderr[-3000:]
    assert_published_clean(out)


@pytest.mark.e2e
def test_a_killed_builds_lock_is_taken_over(lite0_teacher, tmp_path):
    """A build killed while holding the lock leaves it behind: its pid is gone from this host, so the next build
    takes it over by itself. A lock made on another host needs --resume (its processes cannot be seen here)."""
    zoo, out = lite0_teacher[2], tmp_path / "store"
    killed = start_build_until_locked(zoo, out)
    killed.kill()
    killed.wait()
    lock = out.with_name(out.name + ".partial") / LOCK
    record = json.loads(lock.read_text())
    assert record["pid"] == killed.pid
    lock.write_text(json.dumps({**record, "host": "another-host"}))
    with pytest.raises(SystemExit) as exit_info:
        build_main(build_args(zoo, out))
    assert exit_info.value.code == 2 and json.loads(lock.read_text())["host"] == "another-host"
    assert build_main([*build_args(zoo, out), "--resume"]) == 0
    assert_published_clean(out)

    out = tmp_path / "again"
    killed = start_build_until_locked(zoo, out)
    killed.kill()
    killed.wait()
    resumed = run("reinforce.build", *build_args(zoo, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_published_clean(out)


@pytest.mark.parametrize(("text", "expected"), [
    ("data: !!python/object/apply:os.system ['touch SENTINEL']\n",
     "line 1, column 7: could not determine a constructor for the tag"),
    ("- data: fashion-mnist:train\n- grid: {}\n", "a recipe is a mapping of sections"),
    ("data: fashion-mnist:train\ngrid: [10, 20\n", "line 3, column 1: expected ',' or ']'"),
    ("data: x\n\tgrid: 5\n", "line 2, column 1: found character '\\t' that cannot start any token"),
    ("data: x\ngrid: 5\n", "grid must be a mapping"),
])
def test_bad_recipes_are_one_line_naming_file_and_line(tmp_path, capsys, text, expected):
    """``python -m train.pipeline RECIPE`` (its ``main``, in process: five interpreters would cost 40 s here)."""
    sentinel = tmp_path / "ran"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace("SENTINEL", str(sentinel)))
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([str(recipe), "--plan", "--run-dir", str(tmp_path / "run")])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in error, error
    assert error.startswith(f"train.pipeline: error: {recipe}") and expected in error, error
    assert not sentinel.exists()


@pytest.mark.e2e
def test_a_corrupt_safetensors_file_is_one_line(tmp_path):
    """A weights file whose header lies (a length past the end, then not JSON) is refused naming the file."""
    weights = tmp_path / "vfm.safetensors"
    weights.write_bytes((64).to_bytes(8, "little") + b'{"w": {"dtype": "F32", nonsense')
    error = one_line_error(run("train.teacher", "--backbone", "resnet18", "--weights", str(weights), "--mode",
                               "frozen", "--name", "x", "--out-dir", str(tmp_path / "zoo")), "train.teacher")
    assert f"{weights} is not a readable safetensors file" in error, error


def test_an_unreadable_image_or_student_file_is_one_line(photo_dir, tmp_path, capsys):
    """``train.evaluate`` on labeled data holding a file that is no image, then on a student whose weights file is
    cut inside its header: one line naming the file each time."""
    student = tmp_path / "student"
    save_student(*create_student("mobilenetv3_small_050", class_names=("a", "b"), input_size=32), student)
    data = tmp_path / "labeled"
    for label, names in (("a", ("chelsea", "coffee")), ("b", ("rocket", "astronaut"))):
        (data / label).mkdir(parents=True)
        for name in names:
            shutil.copy(photo_dir / f"{name}.png", data / label / f"{name}.png")
    fake, weights = data / "b" / "zz.png", student / "model.safetensors"
    fake.write_bytes(b"\x89PNG not really")

    def one_line() -> str:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["--model", str(student), "--data", f"imagefolder:{data}"])
        error = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "\n" not in error, error
        return error

    assert f"{fake}: not a readable image" in one_line()
    fake.unlink()
    weights.write_bytes(weights.read_bytes()[:100])
    assert f"{weights} is not a readable safetensors file" in one_line()


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """A ValueError raised inside a dependency (here numpy, called wrongly by a patched-in internal) is a bug, not
    the user's input: it reaches the caller with its traceback, while the same command's input errors are one line."""
    def broken_read(path):
        return np.reshape(np.arange(3), (2, 2))

    monkeypatch.setattr("train.recipe.read_recipe", broken_read)
    with pytest.raises(ValueError, match="cannot reshape array"):
        pipeline.main([str(tmp_path / "recipe.yaml"), "--plan"])


class Payload:
    """What a planted pickle runs when it is loaded: it creates ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.e2e
def test_distill_loads_no_checkpoint_it_did_not_write(lite0_teacher, tmp_path):
    """A checkpoint directory planted in --out (DeepSpeed's layout, a pickle that would create a file) is refused
    without --resume, and with --resume because no run.json of this run is there: nothing is unpickled. A run's
    own checkpoint is continued: ``train.pipeline`` rerunning its stopped distill stage passes --resume."""
    zoo = lite0_teacher[2]
    store = tmp_path / "store"
    assert build_main(build_args(zoo, store)) == 0
    out, sentinel = tmp_path / "student", tmp_path / "ran"
    tag = out / "checkpoints" / "global_step1"
    tag.mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("global_step1")
    (tag / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(Payload(sentinel)))
    args = ["--store", str(store), "--student", "mobilenetv3_small_050", "--size", "32", "--epochs", "1",
            "--batch-size", "16", "--workers", "0", "--out", str(out)]
    error = one_line_error(run("train.distill", *args), "train.distill")
    assert "holds a checkpoint: rerun with --resume" in error, error
    error = one_line_error(run("train.distill", *args, "--resume"), "train.distill")
    assert "run.json is missing or unreadable" in error and "refusing to load its pickle files" in error, error
    assert not sentinel.exists()

    # the pipeline's own distill stage, stopped after its first epoch, is continued (it adds --resume) from the
    # checkpoint that run wrote, with its run.json
    shutil.rmtree(out)
    assert run("train.distill", *args).returncode == 0
    assert json.loads((out / "checkpoints" / "run.json").read_text())["store_id"] == open_store(store).manifest.store_id
    epochs = args.index("--epochs") + 1
    step = pipeline.Step("distill", (*args[:epochs], "2", *args[epochs + 1:]), out)
    record = pipeline.Runner(tmp_path).ensure(step)
    assert record["command"].endswith("--resume")
    history = json.loads((out / "student.json").read_text())["history"][-1]
    assert history["epochs"] == 2 and history["resumed_from"]["epoch"] == 1


class FailingDataset(torch.utils.data.Dataset):
    """Item 0 raises ``error``: in a DataLoader worker, as a shard read by ``StreamReplay`` would."""

    def __init__(self, error: Exception):
        self.error = error

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise self.error


def _raised(function) -> BaseException:
    try:
        function()
    except Exception as error:
        return error
    raise AssertionError("nothing raised")


def test_which_errors_are_the_users(tmp_path):
    """The net's rule on real errors: input errors by type, the OS's refusals, our own checks; not a ValueError
    from inside numpy. A DataLoader worker's error is judged by the worker's traceback and shown by its message."""
    from reinforce.sources.files import load_file

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image")
    assert is_user_error(_raised(lambda: load_file(str(garbage))))  # InputError naming the file
    assert is_user_error(_raised(garbage.with_name("missing").read_bytes))  # in pathlib, but errno is set
    assert is_user_error(_raised(lambda: Location("nosuchprotocol://bucket/store")))
    assert is_user_error(_raised(lambda: importlib.import_module("no_such_optional_package")))
    assert not is_user_error(_raised(lambda: np.reshape(np.arange(3), (2, 2))))
    assert not is_user_error(_raised(lambda: importlib.import_module("train.no_such_module")))
    corrupt = StoreCorruptError("shards/shard-000003.tar: truncated or corrupt tar shard")
    for error, ours in ((corrupt, True), (ValueError("a bug in a dataset"), False)):
        loader = torch.utils.data.DataLoader(FailingDataset(error), num_workers=1)
        raised = _raised(lambda loader=loader: next(iter(loader)))
        assert type(raised) is type(error) and is_user_error(raised) == ours
        assert _message(raised) == str(error)
