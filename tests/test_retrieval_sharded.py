"""`index build` under torchrun (gloo, CPU, 2 and 3 processes): every rank writes its own segments, rank 0
trains and merges the first stage; the index equals a one-process build of the same images."""
import os
import sys
import textwrap

import faiss
import numpy as np
import pytest

from siglip_dola import distributed
from siglip_dola.loading import load
from siglip_dola.retrieval import build_index, open_index
from siglip_dola.index_options import StoreOptions
from test_distributed import run_in_own_group
from tiny_index import write_images

LAYERS = [2, 4]

WORKER = textwrap.dedent('''
    import sys
    from siglip_dola import cli, distributed

    model_dir, images, out, factory = sys.argv[1:5]
    with distributed.distributed_session() as (rank, world):
        code = cli.main(["index", "build", images, "--out", out, "--model", model_dir, "--device", "cpu",
                         "--layers", "2,4", "--chunk-size", "2", "--quiet", "--index-factory", factory])
        assert code == 1, code  # one corrupt image skipped (exit 1)
''')


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), 9, corrupt=["broken.png"])


# Known bug, open: in about 1 run of 6 one rank aborts ("terminate called without an active exception", SIGABRT)
# early in the build; the cause is not found yet. Not strict, so a run that passes still checks everything below.
@pytest.mark.xfail(strict=False, reason="a rank sometimes aborts in a sharded build (SIGABRT); cause not found yet")
@pytest.mark.parametrize("world,factory", [(2, "SQfp16"), (3, "IVF2,Flat")])
def test_sharded_build_equals_one_process(tiny_siglip_folder, images, tmp_path, world, factory):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "120"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master-port={distributed.free_port()}", str(script), str(tiny_siglip_folder), str(images),
               str(tmp_path / "sharded"), factory]
    proc = run_in_own_group(command, env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]

    model = load(tiny_siglip_folder, device="cpu")
    single = build_index([images], tmp_path / "single", model, layers=LAYERS, chunk_size=2, progress=False,
                         store_options=StoreOptions(index_factory=factory))
    sharded_index, single_index = open_index(tmp_path / "sharded"), open_index(tmp_path / "single")
    manifest = sharded_index.manifest
    assert [s["name"] for s in manifest.segments] == [s["name"] for s in single.segments]  # one per chunk, in order
    assert sharded_index.paths == single_index.paths and len(sharded_index) == 9
    assert manifest.skipped == single.skipped and "broken.png" in manifest.skipped[0][0]
    assert not (tmp_path / "sharded" / ".staging").exists()
    rows = list(range(1 + len(LAYERS)))
    ours, theirs = sharded_index.vectors(np.arange(9), rows), single_index.vectors(np.arange(9), rows)
    step = np.abs(theirs).max(axis=-1, keepdims=True) / 127  # one int8 step: rounding of nearly equal inputs
    assert np.all(np.abs(ours - theirs) <= step + 1e-6)
    # the merged first stage holds every image under its id, as the one-process build's does
    assert manifest.first_stage["factory"] == factory
    finals = np.ascontiguousarray(single_index.vectors(np.arange(9), [0])[0])
    _, got = sharded_index.faiss_index.search(finals, 1)
    _, expected = single_index.faiss_index.search(finals, 1)
    np.testing.assert_array_equal(got, expected)
    if factory.startswith("IVF"):
        ivf = faiss.extract_index_ivf(sharded_index.faiss_index)
        assert ivf.ntotal == 9 and sorted(ivf.invlists.list_size(i) for i in range(ivf.nlist)) == sorted(
            faiss.extract_index_ivf(single_index.faiss_index).invlists.list_size(i) for i in range(ivf.nlist))
