"""`index build` under torchrun (gloo, CPU, 2 and 3 processes): every rank writes its own segments, rank 0
trains and merges the first stage; the index equals a one-process build of the same images, also after a
rank died mid-build and the same command was run again."""
import os
import sys
import textwrap

import faiss
import numpy as np
import pytest

from siglip_dola import distributed
from siglip_dola.loading import load
from siglip_dola.retrieval import build_index, open_index, storage
from siglip_dola.index_options import StoreOptions
from test_distributed import run_in_own_group
from tiny_index import write_images

LAYERS = [2, 4]

# CRASH=<rank>:<stage> makes that rank die (os._exit, as a killed process: no cleanup, no Python unwinding)
# right after its first segment is written ("embed") or after it encoded its segments ("commit");
# every rank lists the segments it embeds in <out>.rank<r>.log.
WORKER = textwrap.dedent('''
    import os
    import sys
    from siglip_dola import cli, distributed
    from siglip_dola.retrieval import commit, segment

    model_dir, images, out, factory = sys.argv[1:5]
    crash_rank, _, crash_stage = os.environ.get("CRASH", "-1:").partition(":")
    with distributed.distributed_session() as (rank, world):
        write_segment, encode_and_add = segment.write_segment, commit._encode_and_add

        def logged_write(folder, *args, **kwargs):
            meta = write_segment(folder, *args, **kwargs)
            with open(f"{out}.rank{rank}.log", "a") as log:
                log.write(folder.name + "\\n")
            if rank == int(crash_rank) and crash_stage == "embed":
                os._exit(3)
            return meta

        def crashing_encode(*args, **kwargs):
            encode_and_add(*args, **kwargs)
            if rank == int(crash_rank) and crash_stage == "commit":
                os._exit(3)
        segment.write_segment, commit._encode_and_add = logged_write, crashing_encode
        code = cli.main(["index", "build", images, "--out", out, "--model", model_dir, "--device", "cpu",
                         "--layers", "2,4", "--chunk-size", "2", "--quiet", "--index-factory", factory])
        assert code == 1, code  # one corrupt image skipped (exit 1)
''')


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), 9, corrupt=["broken.png"])


def _torchrun(tmp_path, model_dir, images, world, factory, crash=""):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "120", "CRASH": crash or "-1:"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master-port={distributed.free_port()}", str(script), str(model_dir), str(images),
               str(tmp_path / "sharded"), factory]
    return run_in_own_group(command, env, timeout=400)


def _embedded(tmp_path, world) -> list[list[str]]:
    """Per rank, the segments it embedded (and wrote) since the last call; the logs are emptied."""
    runs = []
    for rank in range(world):
        log = tmp_path / f"sharded.rank{rank}.log"
        runs.append(log.read_text().split() if log.exists() else [])
        log.unlink(missing_ok=True)
    return runs


def _assert_equals_one_process_build(model_dir, images, tmp_path, factory):
    model = load(model_dir, device="cpu")
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
    levels = np.array([127] + [7] * len(LAYERS))[:, None, None]  # the default int8+int4 store: final int8, layers int4
    step = np.abs(theirs).max(axis=-1, keepdims=True) / levels  # one step: rounding of nearly equal inputs
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
    return single


@pytest.mark.parametrize("world,factory", [(2, "SQfp16"), (3, "IVF2,Flat")])
def test_sharded_build_equals_one_process(tiny_siglip_folder, images, tmp_path, world, factory):
    proc = _torchrun(tmp_path, tiny_siglip_folder, images, world, factory)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = _assert_equals_one_process_build(tiny_siglip_folder, images, tmp_path, factory)
    chunks = [s["name"] for s in single.segments]  # 5 chunks of 2 files (9 images + the corrupt file)
    bounds = [distributed.shard_bounds(len(chunks), rank, world) for rank in range(world)]
    assert _embedded(tmp_path, world) == [chunks[start:stop] for start, stop in bounds]  # each rank its own run


@pytest.mark.parametrize("world,factory,stage", [(2, "IVF2,Flat", "embed"), (3, "SQfp16", "commit")])
def test_a_rank_dying_mid_build_resumes_on_rerun(tiny_siglip_folder, images, tmp_path, world, factory, stage):
    crashed = _torchrun(tmp_path, tiny_siglip_folder, images, world, factory, crash=f"1:{stage}")
    assert crashed.returncode != 0, crashed.stderr[-4000:]
    assert not (tmp_path / "sharded" / storage.MANIFEST).exists()  # nothing committed
    before = _embedded(tmp_path, world)
    staging = tmp_path / "sharded" / storage.STAGING
    finished = {folder.name for folder in staging.glob("seg-*") if (folder / "meta.json").is_file()}
    assert set(before[1]) <= finished and before[1]  # rank 1's segments written before it died are complete

    resumed = _torchrun(tmp_path, tiny_siglip_folder, images, world, factory)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    after = _embedded(tmp_path, world)
    single = _assert_equals_one_process_build(tiny_siglip_folder, images, tmp_path, factory)
    chunks = [s["name"] for s in single.segments]
    for rank in range(world):
        start, stop = distributed.shard_bounds(len(chunks), rank, world)
        assert after[rank] == [name for name in chunks[start:stop] if name not in finished]  # only the missing
    assert "rank 1 reusing" in resumed.stderr
    if stage == "commit":
        assert not any(after)  # every segment was staged before the crash: nothing is embedded again
