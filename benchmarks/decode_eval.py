"""`eval` with --decode gpu beside --decode cpu, against the forward alone, and their agreement on the same files.

One run, one GPU, one process:
1. N synthetic 500x375 JPEGs and a random-init open_clip model folder (eval_inputs.py, as eval_throughput.py);
2. the forward alone (all layers read, preloaded device tensors: eval_throughput.forward_only);
3. `evaluate()` (what `siglip-dola eval` calls after loading) with decode='cpu' and decode='gpu', interleaved for
   --rounds rounds (medians), and each input loop alone (iter_pixel_batches, no forward);
4. agreement of the two decodes on the same files: top-1 of every mode and the dynamic mode's premature layer
   (from eval's per-image predictions), min cosine of z_N and of every z_j (embed_images), the pixels' mean and
   max difference; for this model on the JPEGs above, and (--embedded) for the embedded model, which is trained, on
   the shapes test split written as JPEGs.
Nothing is asserted. The host's cores are what the process may use: run it under `taskset -c 0-3` for 4.

    python benchmarks/decode_eval.py --model-name ViT-B-16-SigLIP --out /tmp/b16.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_inputs import write_image_folder, write_model_folder  # noqa: E402
from eval_throughput import _environment, _guarded, forward_only  # noqa: E402

DECODES = ("cpu", "gpu")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eval_rate(model, root: Path, out: Path, batch_size: int, decode: str, n=None, predictions=None) -> float:
    from siglip_dola.evaluation.evaluate import evaluate

    start = time.perf_counter()
    report = evaluate(model, str(root), out=out, batch_size=batch_size, progress=False, decode=decode, n=n,
                      predictions=predictions)
    return report["n_images"] / (time.perf_counter() - start)


def input_rate(model, items, batch_size: int, decode: str) -> float:
    """images/s of the input loop alone: files -> fp32 pixels on the device, no forward."""
    from siglip_dola.embedding.pixel_batches import iter_pixel_batches

    start, count = time.perf_counter(), 0
    for batch in iter_pixel_batches(model, items, batch_size, decode=decode):
        count += 0 if batch.pixels is None else batch.pixels.shape[0]
    _sync(torch.device(model.device))
    return count / (time.perf_counter() - start)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def agreement(model, root: Path, items: list, work: Path, batch_size: int, n: int) -> dict:
    """How far decode='gpu' moves eval's results from decode='cpu' on the same n files."""
    import torch.nn.functional as F

    from siglip_dola.embedding.images import embed_images
    from siglip_dola.embedding.pixel_batches import iter_pixel_batches

    rows = {}
    for decode in DECODES:
        eval_rate(model, root, work / f"agree_{decode}.json", batch_size, decode, n=n,
                  predictions=work / f"agree_{decode}.jsonl")
        rows[decode] = _rows(work / f"agree_{decode}.jsonl")
    cpu_rows, gpu_rows = rows["cpu"], rows["gpu"]
    assert [r["id"] for r in cpu_rows] == [r["id"] for r in gpu_rows]
    result = {"n_eval_rows": len(cpu_rows), "top1_agreement": {}, "premature_layer_agreement": {}}
    for mode in cpu_rows[0]["modes"]:
        top = [a["modes"][mode]["top5"][0]["index"] == b["modes"][mode]["top5"][0]["index"]
               for a, b in zip(cpu_rows, gpu_rows)]
        result["top1_agreement"][mode] = sum(top) / len(top)
        if "premature_layer" in cpu_rows[0]["modes"][mode]:
            same = [a["modes"][mode]["premature_layer"] == b["modes"][mode]["premature_layer"]
                    for a, b in zip(cpu_rows, gpu_rows)]
            result["premature_layer_agreement"][mode] = sum(same) / len(same)
    paths = items[:n]
    layers = list(range(1, model.readout.num_layers))
    emb = {d: embed_images(model, paths, layers, batch_size=batch_size, progress=False, decode=d) for d in DECODES}
    final_cos = F.cosine_similarity(emb["cpu"].z_final, emb["gpu"].z_final, dim=-1)
    layer_cos = F.cosine_similarity(emb["cpu"].z_layers, emb["gpu"].z_layers, dim=-1)   # (J, n)
    result.update(n_embedded=int(final_cos.numel()), min_cosine_z_final=float(final_cos.min()),
                  mean_cosine_z_final=float(final_cos.mean()), min_cosine_z_layers=float(layer_cos.min()))
    pixels = {d: torch.cat([b.pixels.float().cpu() for b in iter_pixel_batches(model, paths[:256], batch_size,
                                                                                 decode=d)]) for d in DECODES}
    diff = (pixels["cpu"] - pixels["gpu"]).abs()
    result.update(pixel_mean_abs_diff=float(diff.mean()), pixel_max_abs_diff=float(diff.max()),
                  pixel_share_over_2_levels=float((diff > 2.01 / 255 / 0.5).float().mean()))
    return result


def _shapes_jpegs(root: Path, subsampling: int = -1) -> list[str]:
    """The shapes test split as an ImageFolder of JPEGs (quality 90; subsampling -1: Pillow's default, 4:2:0;
    0: 4:4:4, no chroma subsampling, so nvJPEG's chroma upsampling has nothing to do)."""
    from siglip_dola.data.shapes import CLASSNAMES, make_split

    paths = []
    for index, sample in enumerate(make_split("test")):
        folder = root / CLASSNAMES[sample.label]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:05d}.jpg"
        sample.image.convert("RGB").save(path, "JPEG", quality=90, subsampling=subsampling)
        paths.append(str(path))
    return paths


def embedded_agreement(work: Path, device, batch_size: int) -> dict:
    """The trained embedded model (fp32): decode cpu vs gpu on the shapes test split written as JPEGs, once with
    4:2:0 chroma (Pillow's default) and once with 4:4:4: nvJPEG (as torchvision calls it) upsamples 4:2:0 chroma
    by repeating samples where libjpeg-turbo interpolates, so only the first carries that difference."""
    from siglip_dola.data.datasets import load_dataset
    from siglip_dola.loading import load

    model = load(None, device=device, precision="fp32")
    result = {"cpu_preprocess": repr(model.preprocess)}
    for name, subsampling in (("chroma_420", -1), ("chroma_444", 0)):
        root = work / f"shapes_jpeg_{name}"
        _shapes_jpegs(root, subsampling)
        items = load_dataset(str(root)).items
        result[name] = agreement(model, root, items, work, batch_size, len(items))
    return result


def allocator_race(device, paths: list[str], rounds: int = 20) -> dict:
    """Does decoding write into memory that kernels queued on the compute stream have yet to read?

    Per round: tensors of the decoded images' byte size are filled and synchronised, a ~20 ms sleep kernel and one
    sum per tensor are queued, the tensors are freed (so the allocator may hand their blocks out), a batch is
    decoded, and the sums are checked against their exact values. 'torchvision' calls decode_jpeg on the compute
    stream; 'siglip_dola' is data/gpu_decode.py's path (its own idle stream). Counts of wrong sums."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from siglip_dola.data.gpu_decode import _assemble
    from siglip_dola.data.gpu_transform import map_preprocess
    from siglip_dola.loading import load

    model = load(None, device=device, precision="fp32")
    transform = map_preprocess(model.preprocess)
    datas = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths[:16]]
    numel = int(decode_jpeg(datas[0], mode=ImageReadMode.RGB).numel())
    stream = torch.cuda.Stream(device)
    rows = [(k, p, ("jpeg", d, 1)) for k, (p, d) in enumerate(zip(paths, datas))]
    decoders = {"torchvision": lambda: decode_jpeg(datas, mode=ImageReadMode.RGB, device=device),
                "siglip_dola": lambda: _assemble(rows, paths, transform, model.preprocess, device, stream)}
    wrong = {}
    for name, decode in decoders.items():
        wrong[name] = 0
        for _ in range(rounds):
            held = [torch.full((numel // 4,), float(k + 1), device=device) for k in range(2 * len(datas))]
            torch.cuda.synchronize(device)
            torch.cuda._sleep(20_000_000)
            sums = [t.sum() for t in held]
            del held
            decode()
            torch.cuda.synchronize(device)
            wrong[name] += sum(int(float(s) != (k + 1) * (numel // 4)) for k, s in enumerate(sums))
    return {"rounds": rounds, "tensors_per_round": 2 * len(datas), "wrong_sums": wrong}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="ViT-L-16-SigLIP-384")
    parser.add_argument("--n", type=int, default=3200)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--forward-iters", type=int, default=10)
    parser.add_argument("--agreement-n", type=int, default=512)
    parser.add_argument("--embedded", action="store_true", help="also the embedded model's agreement on shapes")
    parser.add_argument("--work-dir", default="/tmp/sdola_decode_eval")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--commit", default=None, help="commit measured (default: git rev-parse HEAD)")
    args = parser.parse_args()
    from siglip_dola.data.datasets import load_dataset
    from siglip_dola.loading import load

    device, work = torch.device(args.device), Path(args.work_dir)
    root, model_dir = work / "images", work / "model"
    classnames = write_image_folder(root, args.n, args.classes)
    write_model_folder(model_dir, args.model_name, classnames)
    model = load(str(model_dir), device=device, precision="bf16" if device.type == "cuda" else "fp32")
    items = load_dataset(str(root)).items
    errors: dict = {}
    forward = _guarded(errors, "forward", forward_only, model, args.batch_size, args.forward_iters) or {}
    print(f"forward only: {forward}", flush=True)
    for decode in DECODES:   # cuBLAS / Triton / nvJPEG set-up outside the timings
        _guarded(errors, f"warmup_{decode}", eval_rate, model, root, work / "warm.json", args.batch_size, decode,
                 n=4 * args.batch_size)
    rates = {d: [] for d in DECODES}
    for _ in range(args.rounds):
        for decode in DECODES:
            rate = _guarded(errors, f"eval_{decode}", eval_rate, model, root, work / "eval.json", args.batch_size,
                            decode)
            if rate is not None:
                rates[decode].append(rate)
        print(f"eval img/s: {rates}", flush=True)
    inputs = {d: _guarded(errors, f"input_{d}", input_rate, model, items, args.batch_size, d) for d in DECODES}
    print(f"input loop alone img/s: {inputs}", flush=True)
    agree = _guarded(errors, "agreement", agreement, model, root, items, work, args.batch_size, args.agreement_n)
    print(f"agreement: {agree}", flush=True)
    embedded = _guarded(errors, "embedded", embedded_agreement, work, device, args.batch_size) if args.embedded \
        else None
    print(f"embedded model agreement: {embedded}", flush=True)
    race = _guarded(errors, "allocator_race", allocator_race, device,
                    [str(p) for p in sorted((work / "shapes_jpeg_chroma_420").rglob("*.jpg"))]) \
        if args.embedded and device.type == "cuda" else None
    print(f"allocator race: {race}", flush=True)
    medians = {d: statistics.median(r) if r else None for d, r in rates.items()}
    readout = forward.get("readout_all_layers")
    result = {"benchmark": "decode_eval", **_environment(device, args.commit), "model": f"{args.model_name} (open_clip, "
              "random init, random LayerNorm affines), bf16 autocast", "n": args.n, "batch_size": args.batch_size,
              "forward_images_per_s": forward, "eval_images_per_s": medians, "eval_rounds": rates,
              "eval_vs_forward_readout": {d: None if m is None or not readout else m / readout
                                          for d, m in medians.items()},
              "input_loop_images_per_s": inputs, "agreement": agree, "embedded_agreement": embedded, "allocator_race": race,
              "errors": errors}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
