"""``spconv_lite.install_as_spconv`` and ``python -m spconv_lite.as_spconv``: ``import spconv``
resolving to spconv_lite, and spconv's CPU voxel generators in ``spconv.utils``.

Installing changes ``sys.modules`` for the whole process, and the real spconv may be imported
by other tests, so every install happens in a fresh Python process. The clients' own import
patterns run in test_client_parity.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import require_spconv

from spconv_lite import standin
from spconv_lite.as_spconv.utils import Point2VoxelCPU2d, Point2VoxelCPU3d

REPO = Path(__file__).resolve().parents[1]


def run_python(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


# Runs under `python -m spconv_lite.as_spconv check.py a --b`, next to a module `sibling.py`.
CHECK_SCRIPT = '''
import importlib
import sys

import spconv_lite
import sibling  # found because the script's folder leads the import path, as with `python`

assert sys.argv == ["../check.py", "a", "--b"], sys.argv  # as `python ../check.py a --b`
import spconv
assert spconv is spconv_lite.install_as_spconv()  # installing again is harmless
assert spconv.__version__ == "2.3.8" and spconv.SPCONV_VERSION_NUMBERS == [2, 3, 8]
assert spconv.pytorch is spconv_lite.pytorch and spconv.ConvAlgo is spconv_lite.ConvAlgo
for name in ["conv", "core", "functional", "hash", "modules", "ops", "pool", "tables", "utils",
             "constants"]:
    assert importlib.import_module("spconv.pytorch." + name) is getattr(spconv_lite.pytorch, name)
for name in ["constants", "core", "utils"]:
    assert importlib.import_module("spconv." + name) is getattr(spconv_lite.as_spconv, name)
from spconv.pytorch.conv import SparseConvolution
from spconv.pytorch.hash import HashTable
assert SparseConvolution is spconv_lite.nn.conv.SparseConvolution
assert HashTable is spconv_lite.hash_table.HashTable
for missing in ["spconv.pytorch.quantization", "spconv.build"]:
    try:
        importlib.import_module(missing)
    except ImportError:
        pass
    else:
        raise AssertionError(missing + " imported")
print("checked", spconv.__file__)
'''


def test_script_runs_with_spconv_resolving_to_spconv_lite(tmp_path):
    (tmp_path / "check.py").write_text(textwrap.dedent(CHECK_SCRIPT))
    (tmp_path / "sibling.py").write_text("")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_python(["-m", "spconv_lite.as_spconv", "../check.py", "a", "--b"], elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"checked {REPO / 'spconv_lite' / 'as_spconv' / '__init__.py'}" in done.stdout


def test_module_runs_with_spconv_resolving_to_spconv_lite(tmp_path):
    (tmp_path / "client_module.py").write_text(textwrap.dedent('''
        import sys
        import spconv.pytorch as spconv
        print("argv", sys.argv[1:], "layer", spconv.SubMConv3d.__module__)
    '''))
    done = run_python(["-m", "spconv_lite.as_spconv", "-m", "client_module", "x", "-y"],
                      tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "argv ['x', '-y'] layer spconv_lite.nn.conv" in done.stdout


# Processes the launched script starts: a plain subprocess (as torchrun starts DDP ranks) and a
# multiprocessing spawn child (torch.multiprocessing.spawn, spawned DataLoader workers), which
# takes its import path from the parent.
CHILDREN_SCRIPT = '''
import multiprocessing
import subprocess
import sys


def spconv_file(queue):
    import spconv.pytorch
    queue.put(spconv.__file__ + " " + spconv.pytorch.SubMConv3d.__module__)


if __name__ == "__main__":
    import spconv
    print("parent", spconv.__file__)
    child = subprocess.run([sys.executable, "-c", "import spconv.pytorch as s, spconv; "
                            "print(spconv.__file__, s.SubMConv3d.__module__)"],
                           capture_output=True, text=True, check=True)
    print("subprocess", child.stdout.strip())
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    worker = context.Process(target=spconv_file, args=(queue,))
    worker.start()
    print("spawned", queue.get(timeout=120))
    worker.join()
'''


def test_processes_the_script_starts_get_spconv_lite_too(tmp_path):
    (tmp_path / "children.py").write_text(textwrap.dedent(CHILDREN_SCRIPT))
    done = run_python(["-m", "spconv_lite.as_spconv", "children.py"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    stand_in = REPO / "spconv_lite" / "as_spconv" / "__init__.py"
    assert done.stdout.split("\n")[:-1] == [
        f"parent {stand_in}",
        f"subprocess {stand_in} spconv_lite.nn.conv",
        f"spawned {stand_in} spconv_lite.nn.conv",
    ]


def test_launcher_keeps_the_working_directory_on_the_childrens_path(tmp_path):
    """An empty PYTHONPATH entry (``export PYTHONPATH=$PYTHONPATH:/x`` with none set before)
    puts the working directory on the import path; the launcher keeps it for the children."""
    (tmp_path / "from_cwd.py").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.py").write_text("import from_cwd\nprint('imported from_cwd')\n")
    (tmp_path / "parent.py").write_text(
        "import subprocess, sys\nsubprocess.run([sys.executable, 'sub/child.py'], check=True)\n")
    done = subprocess.run([sys.executable, "-m", "spconv_lite.as_spconv", "parent.py"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "imported from_cwd\n"


# A small network with every kind of layer whose attributes spconv pickles: submanifold and
# strided convs sharing keys, a pool, an inverse conv returning to the strided conv's sites.
NETWORK = '''
import torch


def build(spconv):
    torch.manual_seed(0)
    return spconv.SparseSequential(
        spconv.SubMConv3d(3, 8, 3, indice_key="s1"), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
        spconv.SubMConv3d(8, 8, 3, indice_key="s1"),
        spconv.SparseConv3d(8, 16, 3, stride=2, padding=1, indice_key="down"),
        spconv.SparseMaxPool3d(1),
        spconv.SparseInverseConv3d(16, 8, 3, indice_key="down"),
        spconv.SubMConv3d(8, 4, 1),
    ).eval()


def sites():
    gen = torch.Generator().manual_seed(1)
    flat = torch.randperm(12 ** 3, generator=gen)[:300]
    coords = torch.stack([flat // 144, flat // 12 % 12, flat % 12], 1)
    indices = torch.cat([torch.zeros(300, 1, dtype=torch.long), coords], 1).int()
    return torch.randn(300, 3, generator=gen), indices
'''

# Loads the model spconv pickled whole and runs it next to the same network built afresh.
LOAD_PICKLED = '''
import sys
import spconv.pytorch as spconv
import torch
from network import build, sites

model = torch.load(sys.argv[1], weights_only=False)
assert type(model).__module__.startswith("spconv_lite"), type(model)
fresh = build(spconv)
fresh.load_state_dict(model.state_dict())
features, indices = sites()
with torch.no_grad():
    out, want = (net(spconv.SparseConvTensor(features, indices, [12, 12, 12], 1))
                 for net in (model, fresh))
assert torch.equal(out.indices, want.indices) and torch.equal(out.features, want.features)
# A new layer reusing a key the pickled layers' maps are stored under (the same geometry).
head = spconv.SubMConv3d(4, 2, 3, indice_key="s1")
with torch.no_grad():
    assert torch.equal(head(out).features, head(want).features)
print("same output")
'''


def test_a_model_spconv_pickled_whole_loads_and_runs(tmp_path):
    # torch.save(model) pickles each layer's attributes (spconv's geometry lists) and its
    # load_state_dict hook, a bound method that unpickling looks up by name on our class.
    spconv_ref = require_spconv()
    (tmp_path / "network.py").write_text(NETWORK)
    (tmp_path / "load.py").write_text(LOAD_PICKLED)
    namespace = {}
    exec(NETWORK, namespace)
    torch.save(namespace["build"](spconv_ref), tmp_path / "model.pt")
    done = run_python(["-m", "spconv_lite.as_spconv", "load.py", "model.pt"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same output" in done.stdout


def test_install_refuses_when_spconv_is_already_imported(tmp_path):
    require_spconv()
    done = run_python(["-c", "import spconv, spconv_lite; spconv_lite.install_as_spconv()"],
                      tmp_path)
    assert done.returncode != 0
    assert "RuntimeError: spconv is already imported" in done.stderr
    assert "before anything imports spconv" in done.stderr


@pytest.mark.parametrize("argv,message", [
    ([], "usage: python -m spconv_lite.as_spconv SCRIPT"),
    (["-m"], "usage: python -m spconv_lite.as_spconv SCRIPT"),
    (["no_such_script.py", "--flag"], "script 'no_such_script.py' not found"),
])
def test_launcher_refuses_bad_command_lines(argv, message, monkeypatch, tmp_path):
    # Refused before anything is installed, so this can run in the test process.
    monkeypatch.chdir(tmp_path)
    modules = dict(sys.modules)
    with pytest.raises(SystemExit, match=message):
        standin.main(argv)
    assert sys.modules.get("spconv") is modules.get("spconv")


def test_launcher_help(capsys):
    standin.main(["--help"])
    assert "python -m spconv_lite.as_spconv -m MODULE" in capsys.readouterr().out


# ------------------------------------------------------------ spconv.utils voxel generators

def test_point2voxel_outputs_stay_valid_after_the_next_call():
    # numpy results are views of torch outputs; the next call must not reuse their memory.
    gen = Point2VoxelCPU3d([1.0, 1.0, 1.0], [0, 0, 0, 8, 8, 8], 4, 100, 3)
    rng = np.random.default_rng(0)
    first = gen.point_to_voxel((rng.random((200, 4)) * 8).astype(np.float32))
    kept = [a.copy() for a in first]
    gen.point_to_voxel((rng.random((300, 4)) * 8).astype(np.float32))
    for array, copy in zip(first, kept):
        np.testing.assert_array_equal(array, copy)


def test_point2voxel_2d_and_empty_mean():
    gen = Point2VoxelCPU2d([1.0, 1.0], [0, 0, 4, 4], 3, 10, 2)
    assert gen.grid_size == [4, 4]
    points = torch.tensor([[0.5, 0.5, 1.0], [0.6, 0.5, 3.0], [3.5, 1.5, 5.0]])
    voxels, coords, num = gen.point_to_voxel_empty_mean(points)
    assert coords.tolist() == [[0, 0], [1, 3]] and num.tolist() == [2, 1]
    assert voxels[1].tolist() == [[3.5, 1.5, 5.0], [3.5, 1.5, 5.0]]  # the voxel's own mean


@pytest.mark.parametrize("call,error,message", [
    (lambda: Point2VoxelCPU3d([1.0, 1.0], [0, 0, 4, 4], 3, 10, 2), ValueError,
     r"Point2VoxelCPU3d needs 3 voxel sizes, got vsize_xyz \[1.0, 1.0\]"),
    (lambda: Point2VoxelCPU3d([1.0] * 3, [0, 0, 0, 4, 4, 4], 3, 10, 2).point_to_voxel(
        [[0.5, 0.5, 0.5]]), TypeError, "points must be a cumm tensorview Tensor.*got list"),
    (lambda: Point2VoxelCPU3d([1.0] * 3, [0, 0, 0, 4, 4, 4], 3, 10, 2).point_to_voxel(
        np.zeros((2, 4), np.float32)), ValueError, r"num_point_features.*\[2, 4\]"),
])
def test_point2voxel_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
