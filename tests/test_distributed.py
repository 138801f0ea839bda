"""Sharding helpers, and calibrate / eval / embedding under torchrun (2 CPU processes, gloo) == one process."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from siglip_dola import distributed
from siglip_dola.data import shapes
from siglip_dola.evaluation.calibrate import calibrate
from siglip_dola.embedding.images import embed_images
from siglip_dola.evaluation.evaluate import evaluate
from siglip_dola.loading import load

N_IMAGES = 37  # odd: the two shards differ in size


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 3), (37, 2), (10, 10), (5, 8)])
def test_shard_bounds_match_array_split(n, world):
    expected = np.array_split(np.arange(n), world)
    for rank in range(world):
        start, stop = distributed.shard_bounds(n, rank, world)
        assert list(range(start, stop)) == expected[rank].tolist()
        assert distributed.shard(list(range(n)), rank, world) == expected[rank].tolist()


@pytest.mark.parametrize("rank,world", [(2, 2), (-1, 2), (0, 0)])
def test_shard_bounds_rejects_bad_rank(rank, world):
    with pytest.raises(ValueError, match="rank"):
        distributed.shard_bounds(5, rank, world)


def test_without_torchrun_is_one_process():
    assert distributed.rank_and_world() == (0, 1)
    assert distributed.gather_to_rank0({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_from_rank0(3) == 3
    assert distributed.init_from_env() is False  # no WORLD_SIZE in the test environment


@pytest.fixture(scope="module")
def model_dir(tiny_siglip_folder):
    """A tiny random HF SiglipModel saved as a local folder that `load()` reads (conftest)."""
    return tiny_siglip_folder


WORKER = textwrap.dedent('''
    import sys
    import torch
    from safetensors.torch import save_file
    from siglip_dola import cli, distributed
    from siglip_dola.data import shapes
    from siglip_dola.embedding.images import embed_images
    from siglip_dola.loading import load

    model_dir, out_dir, n = sys.argv[1], sys.argv[2], sys.argv[3]
    common = ["--model", model_dir, "--dataset", "shapes", "--limit", n, "--batch-size", "8", "--no-progress",
              "--device", "cpu"]
    # one process group for the whole script: the CLI commands reuse it (as a single torchrun command would)
    with distributed.distributed_session() as (rank, world):
        assert world == 2
        assert cli.main(["calibrate", *common, "--split", "val", "--out", f"{out_dir}/calib.json"]) == 0
        assert cli.main(["eval", *common, "--split", "test", "--calibration", f"{out_dir}/calib.json",
                         "--out", f"{out_dir}/result.json", "--predictions", f"{out_dir}/predictions.jsonl"]) == 0
        items = [(s.name, s.image) for s in shapes.make_split("test", n=int(n))]
        items[5] = ("broken", None)
        result = embed_images(load(model_dir, device="cpu"), items, [2, 7], batch_size=4, progress=False,
                              workers=1)  # decoding in a DataLoader worker under torchrun
        assert (result is None) == (rank != 0)
        if rank == 0:
            save_file({"z_final": result.z_final, "z_layers": result.z_layers}, f"{out_dir}/embed.safetensors",
                      metadata={"ids": ",".join(result.ids), "skipped": result.skipped[0][0]})
''')




def run_in_own_group(command, env, timeout):
    """Run `command` in a new session; on timeout kill its whole process group (torchrun AND its workers:
    killing torchrun alone leaves the workers orphaned), then fail."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s; killed process group {proc.pid}\n{err[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_exit_barrier_runs_in_a_group_made_by_someone_else(monkeypatch, tmp_path):
    """distributed_session synchronises the ranks also in a process group it did not create, so rank 1 never
    reads calib.json before rank 0 wrote it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        calls = []
        real_barrier = dist.barrier
        monkeypatch.setattr(dist, "barrier", lambda *a, **k: (calls.append("barrier"), real_barrier(*a, **k)))
        with distributed.distributed_session() as (rank, world):
            assert (rank, world) == (0, 1) and calls == []
        assert calls == ["barrier"] and dist.is_initialized()  # synchronised, and the caller's group kept
    finally:
        dist.destroy_process_group()


def test_collective_timeout_is_short_and_configurable(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.collective_timeout().total_seconds() == distributed.DEFAULT_TIMEOUT_S <= 120
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "7.5")
    assert distributed.collective_timeout().total_seconds() == 7.5
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
            distributed.collective_timeout()


FREED = textwrap.dedent('''
    import sys
    import torch.distributed as dist
    from siglip_dola import distributed
    with distributed.distributed_session() as (rank, world):
        group = dist.distributed_c10d._get_default_group()
        import siglip_dola.embedding.images  # imported lazily once the group exists, as `index build` does
        import torch.distributed.nn.functional  # what it imports on newer torch (torchvision -> torch._dynamo)
        distributed.broadcast_from_rank0(rank)
    assert sys.getrefcount(group) == 2, sys.getrefcount(group)  # `group` and the call's argument: nothing else
    del group  # the last reference: its gloo threads end now, not during interpreter shutdown (the abort's setting)
    with open(f"{sys.argv[1]}/freed-{rank}", "w") as out:  # a file per rank: the ranks' stdout lines interleave
        out.write("freed")
''')


def test_the_process_group_is_freed_when_the_session_ends(tmp_path):
    """A group still referenced after destroy_process_group keeps its gloo threads running into interpreter
    shutdown, where one releasing the last collective's tensors aborts the rank now and then (SIGABRT)."""
    script = tmp_path / "freed.py"
    script.write_text(FREED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master-port={distributed.free_port()}", str(script), str(tmp_path)]
    proc = run_in_own_group(command, env, timeout=200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [(tmp_path / f"freed-{rank}").read_text() for rank in (0, 1)] == ["freed", "freed"]


HANG = textwrap.dedent('''
    import os, time
    from siglip_dola import distributed
    with distributed.distributed_session() as (rank, world):
        if rank == 1:
            time.sleep(60)  # rank 0 waits for it in the exit barrier
''')


def test_a_hung_rank_fails_in_seconds(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "3"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master-port={distributed.free_port()}", str(script)]
    proc = run_in_own_group(command, env, timeout=45)
    assert proc.returncode != 0 and "Timed out waiting 3000ms" in proc.stderr  # not after rank 1's 60 s


def test_torchrun_two_processes_match_one_process(model_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={distributed.free_port()}",
               str(script), str(model_dir), str(tmp_path), str(N_IMAGES)]
    proc = run_in_own_group(command, env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    model = load(str(model_dir), device="cpu")
    single_calibration = calibrate(model, "shapes", split="val", n=N_IMAGES, batch_size=8, progress=False)
    multi_calibration = json.loads((tmp_path / "calib.json").read_text())
    assert multi_calibration["n_images"] == N_IMAGES
    assert multi_calibration["choice"] == single_calibration["choice"]
    for multi, single in zip(multi_calibration["scores"], single_calibration["scores"], strict=True):
        assert multi["correct1"] == single["correct1"]
        assert multi["acc5"] == pytest.approx(single["acc5"], abs=1e-6)

    single = evaluate(model, "shapes", split="test", n=N_IMAGES, calibration=tmp_path / "calib.json",
                      batch_size=8, progress=False)
    multi = json.loads((tmp_path / "result.json").read_text())
    assert multi["n_images"] == single["n_images"] == N_IMAGES
    for mode in ("off", "static", "dynamic"):
        assert multi["modes"][mode]["metrics"] == pytest.approx(single["modes"][mode]["metrics"], abs=1e-6)
    assert multi["paired"] == single["paired"]  # same outcomes, same seed: same interval
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert multi["predictions"] == str(tmp_path / "predictions.jsonl")
    assert [r["index"] for r in rows] == list(range(N_IMAGES))  # rank 0 wrote every image, in input order
    assert [r["id"] for r in rows] == [s.name for s in shapes.make_split("test", n=N_IMAGES)]
    static_right = [r["modes"]["static"]["top5"][0]["index"] == r["label_index"] for r in rows]
    assert np.mean(static_right) == pytest.approx(single["modes"]["static"]["metrics"]["acc1"])
    assert multi["layer_lens"]["dynamic_layer_counts"] == single["layer_lens"]["dynamic_layer_counts"]
    assert multi["layer_lens"]["top1"] == pytest.approx(single["layer_lens"]["top1"], abs=1e-6)
    assert multi["layer_lens"]["mean_jsd"] == pytest.approx(single["layer_lens"]["mean_jsd"], rel=1e-4, abs=1e-7)

    items = [(s.name, s.image) for s in shapes.make_split("test", n=N_IMAGES)]
    items[5] = ("broken", None)
    reference = embed_images(model, items, [2, 7], batch_size=4, progress=False)
    sharded = load_file(tmp_path / "embed.safetensors")
    with open(tmp_path / "embed.safetensors", "rb") as handle:  # ids and skipped ride in the header metadata
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))["__metadata__"]
    assert header["ids"].split(",") == reference.ids and header["skipped"] == "broken"
    torch.testing.assert_close(sharded["z_final"], reference.z_final, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sharded["z_layers"], reference.z_layers, rtol=1e-5, atol=1e-6)
