"""Stores on object storage, against a real S3-compatible server (moto's standalone server) on loopback:
built straight into a bucket, listed, verified, published from disk, trained from; a build killed
mid-way publishes nothing; a deleted shard and a missing store are one clear line each. The server's
request log shows that training reads only the arrays of the targets it distills."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO, cli_env

from stores.__main__ import main as stores_main
from stores.location import Location
from stores.lock import LOCK, StoreLock, StoreLockedError
from stores.store import open_store

SPEC = "fashion-mnist:test?limit=64"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """``(env, log)``: a moto S3 server process on a free loopback port with bucket ``stores``; ``env`` reaches it
    (also set in this process), ``log`` is the server's request log."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("s3") / "requests.log"
    with open(log, "w") as requests:  # the server keeps its own descriptor
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                                   str(port)], stdout=subprocess.DEVNULL, stderr=requests)
    env = {**AWS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        Location("s3://stores").fs.mkdir("stores")
        yield cli_env(**env), log
    finally:
        server.terminate()
        server.wait()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run(module: str, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert not check or result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def build_args(zoo: Path, out: str) -> list[str]:
    return ["--teacher", str(zoo), "--transfer-set", SPEC, "--targets", "logits,embedding", "--views", "2",
            "--unit-samples", "16", "--chunk-samples", "8", "--batch-size", "32", "--workers", "0", "--out", out]


def requests_since(log: Path, offset: int) -> list[tuple[str, str]]:
    """(method, path) of every request the server logged after ``offset`` (its colour codes removed)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text()[offset:])
    return re.findall(r'"(GET|PUT|HEAD|POST|DELETE) (\S+)', text)


def test_build_list_verify_and_train_on_s3(s3, lite0_teacher, tmp_path):
    env, log = s3
    url = "s3://stores/catalog/fmnist"
    run("reinforce.build", *build_args(lite0_teacher[2], url), env=env)
    assert not Location("s3://stores/catalog/fmnist.partial").exists(), "the partial build is gone once published"

    listed = json.loads(run("stores", "ls", "s3://stores/catalog", "--json", env=env).stdout)
    assert [(row["name"], row["samples"], row["views"]) for row in listed] == [("fmnist", 64, 2)]
    assert "checksums and every chunk verified" in run("stores", "verify", url, env=env).stdout

    local = tmp_path / "local"  # the same inputs built on disk: the same store id and bytes
    run("reinforce.build", *build_args(lite0_teacher[2], str(local)), env=env)
    assert open_store(local).manifest.store_id == open_store(url).manifest.store_id
    assert run("stores", "publish", str(local), "s3://stores/catalog/copy", env=env).returncode == 0
    copied, original = open_store("s3://stores/catalog/copy").manifest, open_store(local).manifest
    assert {f.path: f.sha256 for f in copied.files} == {f.path: f.sha256 for f in original.files}
    again = run("stores", "publish", str(local), "s3://stores/catalog/copy", env=env, check=False)
    assert again.returncode == 2 and "already holds a published store" in again.stderr

    offset = len(log.read_text())
    out = tmp_path / "student"
    run("train.distill", "--store", url, "--targets", "logits", "--student", "mobilenetv3_small_050", "--size", "32",
        "--epochs", "1", "--batch-size", "16", "--workers", "0", "--out", str(out), env=env)
    assert json.loads((out / "student.json").read_text())["history"][-1]["steps"] == 4
    paths = [path for method, path in requests_since(log, offset) if method == "GET"]
    assert any("/targets.zarr/logits/" in p for p in paths) and any("/targets.zarr/theta/" in p for p in paths)
    assert not any("/targets.zarr/embedding/" in p for p in paths), "training read a target it does not distill"


def test_killed_build_on_s3_publishes_nothing_then_resumes(s3, lite0_teacher):
    env, _ = s3
    url = "s3://stores/killed/fmnist"
    partial = Location(url + ".partial")
    process = subprocess.Popen([sys.executable, "-m", "reinforce.build", *build_args(lite0_teacher[2], url)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        if partial.listdir("commits"):
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not Location(url).exists(), "a killed build left objects under the final URL"
    assert json.loads(run("stores", "ls", "s3://stores/killed", "--json", env=env).stdout) == []
    missing = run("stores", "verify", url, env=env, check=False)
    assert missing.returncode == 2 and url in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    run("reinforce.build", *build_args(lite0_teacher[2], url), env=env)
    assert "checksums and every chunk verified" in run("stores", "verify", url, env=env).stdout


def test_deleted_shard_and_missing_store_are_named(s3, lite0_teacher, tmp_path):
    env, _ = s3
    url = "s3://stores/damaged/fmnist"
    run("reinforce.build", *build_args(lite0_teacher[2], url), env=env)
    shard = "targets.zarr/logits/values/c/1/0/0"
    Location(url).remove(shard)
    verify = run("stores", "verify", url, env=env, check=False)
    assert verify.returncode == 2 and f"{url}/{shard}: missing" in verify.stderr
    distill = run("train.distill", "--store", url, "--student", "mobilenetv3_small_050", "--out", str(tmp_path / "s"),
                  env=env, check=False)
    assert distill.returncode == 2 and f"{url}/{shard}" in distill.stderr
    assert len(distill.stderr.strip().splitlines()) == 1, distill.stderr
    nowhere = run("train.distill", "--store", "s3://stores/nowhere", "--student", "mobilenetv3_small_050",
                  "--out", str(tmp_path / "n"), env=env, check=False)
    assert nowhere.returncode == 2 and "no reinforced store at 's3://stores/nowhere'" in nowhere.stderr
    assert stores_main(["verify", "s3://stores/nowhere"]) == 2


def test_one_writer_per_store_on_s3(s3):
    """The lock record is a conditional PUT (``If-None-Match: *``): the server refuses a second create of the same
    key (s3fs checks nothing itself in this mode), so two builds cannot both hold one store's lock."""
    partial = Location("s3://stores/locked/fmnist.partial")
    assert partial.create_exclusive("probe", b"first") and not partial.create_exclusive("probe", b"second")
    assert partial.read_bytes("probe") == b"first"
    held = f"pid {os.getpid()} on host .* is writing this store"
    with StoreLock(partial).held(), pytest.raises(StoreLockedError, match=held):
        StoreLock(partial).acquire()
    assert not partial.exists(LOCK)
