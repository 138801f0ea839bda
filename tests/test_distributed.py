"""Sharding helpers, and calibrate / eval / embedding under torchrun (2 CPU processes, gloo) == one process."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import SiglipModel

from siglip_dola import distributed
from siglip_dola.data import shapes
from tools import train_embedded as te
from siglip_dola.evaluation.calibrate import calibrate
from siglip_dola.evaluation.embed import embed_images
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
def model_dir(tmp_path_factory):
    """A tiny random HF SiglipModel saved as a local folder that `load()` reads."""
    folder = tmp_path_factory.mktemp("tiny_siglip")
    torch.manual_seed(0)
    cfg = te.TrainConfig(vision_layers=12, text_layers=1, hidden_size=16, num_heads=2, patch_size=16)
    tokenizer = te.build_tokenizer()
    model = SiglipModel(te.build_model_config(cfg, vocab_size=len(tokenizer))).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    te.build_image_processor().save_pretrained(folder)
    return folder


WORKER = textwrap.dedent('''
    import sys
    import torch
    from safetensors.torch import save_file
    from siglip_dola import cli, distributed
    from siglip_dola.data import shapes
    from siglip_dola.evaluation.embed import embed_images
    from siglip_dola.loading import load

    model_dir, out_dir, n = sys.argv[1], sys.argv[2], sys.argv[3]
    common = ["--model", model_dir, "--dataset", "shapes", "--limit", n, "--batch-size", "8", "--no-progress",
              "--device", "cpu"]
    # one process group for the whole script: the CLI commands reuse it (as a single torchrun command would)
    with distributed.distributed_session() as (rank, world):
        assert world == 2
        assert cli.main(["calibrate", *common, "--split", "val", "--out", f"{out_dir}/calib.json"]) == 0
        assert cli.main(["eval", *common, "--split", "test", "--calibration", f"{out_dir}/calib.json",
                         "--out", f"{out_dir}/result.json"]) == 0
        items = [(s.name, s.image) for s in shapes.make_split("test", n=int(n))]
        items[5] = ("broken", None)
        result = embed_images(load(model_dir, device="cpu"), items, [2, 7], batch_size=4, progress=False,
                              workers=1)  # decoding in a DataLoader worker under torchrun
        assert (result is None) == (rank != 0)
        if rank == 0:
            save_file({"z_final": result.z_final, "z_layers": result.z_layers}, f"{out_dir}/embed.safetensors",
                      metadata={"ids": ",".join(result.ids), "skipped": result.skipped[0][0]})
''')




def test_torchrun_two_processes_match_one_process(model_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={distributed.free_port()}",
               str(script), str(model_dir), str(tmp_path), str(N_IMAGES)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
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
        assert multi["metrics"][mode] == pytest.approx(single["metrics"][mode], abs=1e-6)
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
