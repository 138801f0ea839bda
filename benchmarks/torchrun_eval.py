"""Speed-up of the sharded embedding pass (what `calibrate` / `eval` run): 1 process vs K under torchrun.

Both runs embed the same synthetic images with a random-init open_clip model (default ViT-L-16-SigLIP-384),
reading every layer 1..N-1 in one pass as calibrate/eval do, and gather to rank 0. Prints one JSON line:

    python benchmarks/torchrun_eval.py --nproc 2 --num-images 512 --batch-size 32

On a 2-GPU machine each process uses cuda:LOCAL_RANK (nccl, bf16 autocast). The orchestrator launches
`python -m torch.distributed.run --nproc_per_node=1` and `--nproc_per_node=K` with this file in
`--worker` mode; each rank 0 times the pass (after a warm-up, between barriers) and writes its timing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path




def synthetic_items(n: int, size: int, seed: int = 0) -> list:
    """n (id, PIL image) pairs of seeded noise at the model's resolution (so preprocessing is cheap)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [(f"img{i:05d}", Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
            for i in range(n)]


def _timed_pass(model, items, layers, batch_size) -> float:
    import torch
    import torch.distributed as dist

    from siglip_dola.embedding.images import embed_images

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        if dist.is_initialized():
            dist.barrier()
    sync()
    start = time.perf_counter()
    embed_images(model, items, layers, batch_size=batch_size, progress=False)
    sync()
    return time.perf_counter() - start


def worker(args) -> None:
    """One torchrun process: build the model, warm up, time the embedding pass, rank 0 writes JSON."""
    import open_clip
    import torch

    from siglip_dola import distributed
    from siglip_dola.loading import from_model

    with distributed.distributed_session() as (rank, world):
        torch.manual_seed(0)
        device = distributed.local_device() if args.device is None else torch.device(args.device)
        model = from_model(open_clip.create_model(args.arch, pretrained=None).eval().to(device),
                           precision=args.precision)
        items = synthetic_items(args.num_images, model.readout.image_size[0])
        layers = list(range(1, model.readout.num_layers))
        _timed_pass(model, items[:2 * args.batch_size * world], layers, args.batch_size)  # warm-up
        seconds = [_timed_pass(model, items, layers, args.batch_size) for _ in range(args.repeats)]
        if rank == 0:
            Path(args.out).write_text(json.dumps({"world": world, "seconds": seconds, "device": str(device),
                                                  "dtype": str(model.dtype)}))


def launch(nproc: int, args, out: Path) -> dict:
    """Run this file in worker mode under torchrun with nproc processes; return rank 0's timing."""
    from siglip_dola.distributed import free_port

    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master-port={free_port()}", __file__, "--worker", "--out", str(out), "--arch", args.arch,
               "--num-images", str(args.num_images), "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    command += ["--precision", args.precision] if args.precision else []
    command += ["--device", args.device] if args.device else []
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")})
    return json.loads(out.read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-L-16-SigLIP-384", help="open_clip model name (random init)")
    parser.add_argument("--num-images", type=int, default=512, help="synthetic images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--nproc", type=int, default=2, help="processes of the sharded run (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per run (the minimum is reported)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    parser.add_argument("--device", default=None, help="force a device (default: cuda:LOCAL_RANK, else cpu)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        one = launch(1, args, Path(tmp) / "one.json")
        many = launch(args.nproc, args, Path(tmp) / "many.json")
    one_s, many_s = min(one["seconds"]), min(many["seconds"])
    print(json.dumps({"arch": args.arch, "n_images": args.num_images, "batch_size": args.batch_size,
                      "device": one["device"], "dtype": one["dtype"], "one_process_s": round(one_s, 4),
                      f"{args.nproc}_processes_s": round(many_s, 4), "speedup": round(one_s / many_s, 3),
                      "one_process_all_s": one["seconds"], f"{args.nproc}_processes_all_s": many["seconds"]}))


if __name__ == "__main__":
    main()
