"""Shared fixtures (the real Lite0 ImageNet teacher, built once per session, and real photos) and the lanes.

Lanes: a test that runs a command-line tool in a subprocess (``python -m``, torchrun, the DeepSpeed launcher) is
end to end, marked ``e2e`` (everything under ``tests/e2e/`` is); ``make check`` runs the rest. An unmarked test that
starts such a subprocess fails, naming it, so the fast lane stays fast. Every test process and its children run
one intra-op thread: ``make test`` runs two workers (pytest-xdist) on two cores, and oversubscribed OpenMP threads
spin instead of working.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch is imported anywhere in this process
    os.environ[_variable] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

E2E = Path(__file__).parent / "e2e"
CLI_NAMES = ("python", "torchrun", "deepspeed")
_running: list[pytest.Item] = []  # the test whose setup, call or teardown is running


def _command_line_tool(argv: object) -> str | None:
    """The command line when ``argv`` (a Popen audit event's args) starts Python or a launcher, else None."""
    words = shlex.split(argv) if isinstance(argv, str) else [os.fsdecode(w) for w in argv]
    program = os.path.basename(words[0]) if words else ""
    is_tool = words and (words[0] == sys.executable or program.startswith(CLI_NAMES))
    return shlex.join(words) if is_tool else None


def _refuse_unmarked_subprocess(event: str, args: tuple) -> None:
    if event != "subprocess.Popen" or not _running or _running[-1].get_closest_marker("e2e"):
        return
    command = _command_line_tool(args[1])
    if command:
        raise RuntimeError(f"{_running[-1].nodeid} runs a command-line tool in a subprocess ({command[:160]}): "
                           "mark it e2e (pytest.mark.e2e) or move it to tests/e2e/")


sys.addaudithook(_refuse_unmarked_subprocess)


# The longest files (worker seconds, measured on 2 cores), run first: pytest-xdist hands files to workers in
# collection order, and a long file handed out last keeps one worker busy while the other idles (longest first).
LONGEST_FIRST = ("e2e/test_distill.py", "train/test_pipeline.py", "e2e/test_export.py", "reinforce/test_retrieve.py",
                 "train/test_train_cli.py", "stores/test_untrusted_wds.py", "train/test_untrusted_inputs.py",
                 "e2e/test_s3.py", "reinforce/test_teachers.py", "e2e/test_scale.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e/ is e2e; the longest files go first."""
    for item in items:
        if E2E in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)
    here = Path(__file__).parent
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.fspath).relative_to(here).as_posix(), len(rank)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


@pytest.fixture(autouse=True)
def _one_thread():
    """A stage run in process may pin its own thread count (a pipeline recipe's ``threads``): back to one after."""
    yield
    torch.set_num_threads(1)

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


@pytest.fixture(scope="session")
def vfm_home(tmp_path_factory) -> Path:
    """A private $VFM_REINFORCE_HOME, so the converted weights cache never touches the user's."""
    home = tmp_path_factory.mktemp("vfm_home")
    previous = os.environ.get("VFM_REINFORCE_HOME")
    os.environ["VFM_REINFORCE_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("VFM_REINFORCE_HOME", None)
    else:
        os.environ["VFM_REINFORCE_HOME"] = previous


@pytest.fixture(scope="session")
def lite0_teacher(vfm_home):
    """``(model, card, zoo_dir)``: real pretrained Lite0 with its 1000-class head, 64 px input."""
    from reinforce.teachers import embedded_imagenet_teacher, save_teacher

    model, card = embedded_imagenet_teacher(64)
    zoo_dir = vfm_home / "teachers" / "lite0_in1k"
    card = save_teacher(model, card, zoo_dir)
    return model, card, zoo_dir


@pytest.fixture(scope="session")
def random_weights():
    """``fn(library, name, path) -> str``: a random backbone's state_dict as a local checkpoint (stands in for
    real weights, which this machine cannot download)."""
    from reinforce.teachers import create_backbone
    from reinforce.tensor_files import save_tensors

    def write(library: str, name: str, path) -> str:
        return str(save_tensors(create_backbone(library, name).library_state_dict(), path))
    return write


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Real RGB photographs from scikit-image, written as PNG files (a ``folder:`` transfer set)."""
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("photos")
    for name in PHOTO_NAMES:
        Image.fromarray(getattr(skdata, name)()).save(root / f"{name}.png")
    return root
