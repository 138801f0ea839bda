"""clip_benchmark retrieval sets (flickr8k/30k folder + Karpathy file, mscoco captions JSON) and webdataset shards,
written in their real on-disk formats: metrics against a float64 numpy loop over the model's own embeddings
(and clip_benchmark's own recall_at_k), --limit, torchrun-style slicing, and the offline failures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siglip_dola import cli
from siglip_dola.data import shapes, webdataset_shards
from siglip_dola.data.datasets import load_dataset
from siglip_dola.evaluation.evaluate import evaluate
from siglip_dola.text_bank.build import build_text_bank
from tests.dataset_files import captions_of, write_flickr, write_mscoco, write_shards
from tests.test_distributed import run_in_own_group
from tools import train_embedded as te


def own_embeddings(hf_model, loaded, images: list, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised float64 image [I, D] and text [T, D] embeddings from the model's own modules."""
    with torch.no_grad():
        image = hf_model.vision_model(pixel_values=te.pixels_from_images(images)).pooler_output.double().numpy()
        text = loaded.encode_text(texts).double().numpy()
    return (image / np.linalg.norm(image, axis=1, keepdims=True), text / np.linalg.norm(text, axis=1, keepdims=True))


def naive_recalls(image: np.ndarray, text: np.ndarray, text_image: list[int], ks=(1, 5, 10)) -> dict:
    """clip_benchmark's definitions, one query at a time: a text finds its image in its top k images; an image
    finds any of its captions in its top k texts."""
    scores = text @ image.T  # (T, I)
    recalls = {}
    for k in ks:
        t2i = [text_image[t] in sorted(range(image.shape[0]), key=lambda i: -scores[t, i])[:k] for t in range(len(text))]
        i2t = [any(text_image[t] == i for t in sorted(range(len(text)), key=lambda t: -scores[t, i])[:k])
               for i in range(image.shape[0])]
        recalls[f"image_retrieval_recall@{k}"] = float(np.mean(t2i))
        recalls[f"text_retrieval_recall@{k}"] = float(np.mean(i2t))
    return recalls


def clip_benchmark_recalls(image: np.ndarray, text: np.ndarray, text_image: list[int], ks=(1, 5, 10)) -> dict:
    """The same metrics through clip_benchmark's own recall_at_k (as its zeroshot_retrieval.evaluate uses it)."""
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

    scores = torch.from_numpy(text @ image.T)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(text)), torch.tensor(text_image)] = True
    return {**{f"image_retrieval_recall@{k}": float((recall_at_k(scores, positive, k) > 0).float().mean()) for k in ks},
            **{f"text_retrieval_recall@{k}": float((recall_at_k(scores.T, positive.T, k) > 0).float().mean())
               for k in ks}}


def check_retrieval(result: dict, hf_model, loaded, images: list, captions: list[list[str]]) -> None:
    texts = [c for caps in captions for c in caps]
    text_image = [i for i, caps in enumerate(captions) for _ in caps]
    image, text = own_embeddings(hf_model, loaded, images, texts)
    expected = naive_recalls(image, text, text_image)
    assert expected == pytest.approx(clip_benchmark_recalls(image, text, text_image))
    assert result["modes"]["off"]["metrics"] == pytest.approx(expected)
    assert result["n_images"] == len(images) and result["task"] == "zeroshot_retrieval"


@pytest.mark.parametrize("name", ["flickr8k", "flickr30k"])
def test_flickr_folder_with_karpathy_file_through_the_cli(name, tiny_hf_siglip, tiny_loaded, tiny_siglip_folder,
                                                          tmp_path, capsys):
    samples = write_flickr(tmp_path / name, name=name)
    out = tmp_path / "result.json"
    code = cli.main(["eval", "--model", str(tiny_siglip_folder), "--dataset", name, "--dataset-root",
                     str(tmp_path / name), "--task", "retrieval", "--calibration", "none", "--no-progress",
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["dataset"] == name and result["split"] == "test"
    files = [Image.open(tmp_path / name / f"{1000 + i}_img.jpg").convert("RGB") for i in range(len(samples))]
    check_retrieval(result, tiny_hf_siglip, tiny_loaded, files, [captions_of(s) for s in samples])


def test_mscoco_captions_json_all_captions_per_image(tiny_hf_siglip, tiny_loaded, tmp_path):
    samples = write_mscoco(tmp_path / "coco", split="test")
    dataset = load_dataset("mscoco_captions", split="test", root=tmp_path / "coco")
    assert [len(c) for c in dataset.captions] == [2] * len(samples) and dataset.tasks == ("zeroshot_retrieval",)
    result = evaluate(tiny_loaded, dataset, task="zeroshot_retrieval", calibration="none", progress=False)
    files = [Image.open(path).convert("RGB") for path in dataset.items]
    assert [p.name for p in dataset.items][:2] == ["COCO_val2014_000000391895.jpg", "COCO_val2014_000000391902.jpg"]
    check_retrieval(result, tiny_hf_siglip, tiny_loaded, files, [captions_of(s) for s in samples])


def test_calibrate_retrieval_reads_the_val_karpathy_file(tiny_siglip_folder, tmp_path, capsys):
    write_flickr(tmp_path / "f8k", split="val", n=8)
    out = tmp_path / "calibration.json"
    assert cli.main(["calibrate", "--model", str(tiny_siglip_folder), "--dataset", "flickr8k", "--dataset-root",
                     str(tmp_path / "f8k"), "--task", "retrieval", "--no-progress", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["dataset"], report["split"], report["n_images"]) == ("flickr8k", "val", 8)


def _no_download(monkeypatch):
    """clip_benchmark's builder shells out (kaggle, wget) to download: any such call fails the test."""
    from clip_benchmark.datasets import builder

    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args}")
    monkeypatch.setattr(builder, "call", refuse)


@pytest.mark.parametrize("name, present, missing", [
    ("flickr30k", [], ["{root}", "{root}/flickr30k_test_karpathy.txt"]),
    ("flickr8k", ["{root}/1.jpg"], ["{root}/flickr8k_test_karpathy.txt"]),
    ("mscoco_captions", ["{root}/coco_test_karpathy.json"], ["{root}/val2014"]),
    ("mscoco_captions", ["{root}/val2014/x.jpg"], ["{root}/coco_test_karpathy.json"]),
])
def test_missing_files_exit_2_naming_them_without_a_download(name, present, missing, tmp_path, capsys, monkeypatch):
    _no_download(monkeypatch)
    root = tmp_path / "data"
    for path in present:
        path = tmp_path / path.format(root="data")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    for command in ("eval", "calibrate"):
        code = cli.main([command, "--dataset", name, "--dataset-root", str(root), "--task", "retrieval", "--split", "test",
                         "--out", str(tmp_path / "x.json")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        for path in missing:
            assert repr(path.format(root=str(root))) in err
        assert "does not download" in err
    assert not (tmp_path / "x.json").exists()


def test_shards_classification_and_retrieval_match_naive(tiny_hf_siglip, tiny_loaded, tmp_path):
    samples = write_shards(tmp_path / "shards", n=24)
    spec = f"wds:{tmp_path}/shards/{{000000..000002}}.tar"
    dataset = load_dataset(spec)
    assert dataset.split == "all" and dataset.classnames == list(shapes.CLASSNAMES)
    assert dataset.templates == list(shapes.TEMPLATES) and dataset.items.counts == [8, 8, 8]
    files = [item[1] for item in dataset.items]  # decoded by webdataset, as the embedding workers see them
    result = evaluate(tiny_loaded, dataset, calibration="none", progress=False)
    image, _ = own_embeddings(tiny_hf_siglip, tiny_loaded, files, ["x"])
    bank = build_text_bank(tiny_loaded, shapes.CLASSNAMES, shapes.TEMPLATES).embeds.double().numpy()
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    top1 = [max(range(len(bank)), key=lambda c: image[i] @ bank[c]) for i in range(len(files))]
    assert result["modes"]["off"]["metrics"]["acc1"] == pytest.approx(np.mean([p == s.label for p, s in zip(top1, samples)]))
    retrieval = evaluate(tiny_loaded, spec, task="zeroshot_retrieval", calibration="none", progress=False)
    check_retrieval(retrieval, tiny_hf_siglip, tiny_loaded, files, [captions_of(s) for s in samples])


def test_shards_limit_and_rank_slices_open_only_their_tars(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards", n=30, image_format="webp")
    opened = []
    real = webdataset_shards._samples
    monkeypatch.setattr(webdataset_shards, "_samples", lambda urls, **kw: (opened.append(urls[0]), real(urls, **kw))[1])
    dataset = load_dataset(f"wds:{tmp_path}/shards/{{000000..000002}}.tar", n=5)
    assert [item[0] for item in dataset.items] == [f"s{i:07d}" for i in (0, 6, 12, 18, 24)]
    assert dataset.labels == [s.label for s in shapes.make_split("test", n=30)][::6]
    everything = load_dataset(f"wds:{tmp_path}/shards/{{000000..000002}}.tar")  # the index pass reads .cls/.txt only
    opened.clear()
    last_rank = everything.items[20:30]
    assert [last_rank[i][0] for i in range(10)] == [f"s{i:07d}" for i in range(20, 30)]
    assert opened == [str(tmp_path / "shards" / "000002.tar")]  # the first two tars are never read


def test_shards_in_clip_benchmark_export_layout_with_splits(tmp_path):
    for split, n in (("test", 6), ("val", 4)):
        write_shards(tmp_path / "ds" / split, split=split, n=n, n_shards=2, name="{}.tar")
        (tmp_path / "ds" / split / "nshards.txt").write_text("2")
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (tmp_path / "ds" / "test" / name).rename(tmp_path / "ds" / name)
    val = load_dataset(f"wds:{tmp_path}/ds", split="val")
    assert (val.split, len(val.items), val.classnames[:1]) == ("val", 4, ["red circle"])
    with pytest.raises(FileNotFoundError, match="train/nshards.txt"):
        load_dataset(f"wds:{tmp_path}/ds", split="train")


def test_bad_and_missing_shards(tmp_path, capsys, tiny_loaded):
    write_shards(tmp_path / "shards", n=9)
    code = cli.main(["eval", "--dataset", f"wds:{tmp_path}/shards/{{000000..000004}}.tar", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "2 of 5 shard(s) not found" in err and "000003.tar" in err and "000004.tar" in err
    (tmp_path / "garbage.tar").write_bytes(b"not a tar file" * 100)
    code = cli.main(["eval", "--dataset", f"wds:{tmp_path}/garbage.tar", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "could not be read as webdataset tars" in err and "garbage.tar" in err and "Traceback" not in err
    import webdataset as wds  # a sample whose image does not decode is skipped and reported, the rest scored
    with wds.TarWriter(str(tmp_path / "shards" / "000001.tar")) as writer:
        writer.write({"__key__": "broken", "jpg": b"not a jpeg", "cls": "0", "txt": "x"})
    result = evaluate(tiny_loaded, f"wds:{tmp_path}/shards/{{000000..000002}}.tar", calibration="none", progress=False)
    assert result["n_images"] == 6 and result["skipped"][0][0] == "broken"


TORCHRUN = textwrap.dedent('''
    import sys
    from safetensors.torch import save_file
    from siglip_dola import distributed
    from siglip_dola.data.datasets import load_dataset
    from siglip_dola.embedding.images import embed_images
    from siglip_dola.loading import load

    model_dir, spec, out = sys.argv[1:4]
    with distributed.distributed_session() as (rank, world):
        result = embed_images(load(model_dir, device="cpu"), load_dataset(spec, n=10).items, [3], batch_size=4,
                              progress=False, workers=1)
        if rank == 0:
            save_file({"z_final": result.z_final}, out, metadata={"ids": ",".join(result.ids)})
''')


def test_shards_under_torchrun_match_one_process(tiny_siglip_folder, tmp_path):
    from safetensors import safe_open

    from siglip_dola import distributed
    from siglip_dola.embedding.images import embed_images
    from siglip_dola.loading import load

    write_shards(tmp_path / "shards", n=15)
    spec = f"wds:{tmp_path}/shards/{{000000..000002}}.tar"
    (tmp_path / "run.py").write_text(TORCHRUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = run_in_own_group([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master-port={distributed.free_port()}", str(tmp_path / "run.py"),
                             str(tiny_siglip_folder), spec, str(tmp_path / "z.safetensors")], env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = embed_images(load(str(tiny_siglip_folder), device="cpu"), load_dataset(spec, n=10).items, [3],
                         progress=False, workers=0)
    with safe_open(str(tmp_path / "z.safetensors"), "pt") as f:
        assert f.metadata()["ids"].split(",") == alone.ids == [f"s{i * 15 // 10:07d}" for i in range(10)]
        torch.testing.assert_close(f.get_tensor("z_final"), alone.z_final)


def test_shards_through_decode_workers_equal_one_process(tiny_loaded, tmp_path):
    """Each DataLoader worker reads its sub-batches forward through its own copy of the stream."""
    from siglip_dola.embedding.images import embed_images

    write_shards(tmp_path / "shards", n=21)
    items = load_dataset(f"wds:{tmp_path}/shards/{{000000..000002}}.tar").items
    alone = embed_images(tiny_loaded, items, [3], batch_size=4, progress=False, workers=0)
    workers = embed_images(tiny_loaded, items, [3], batch_size=4, progress=False, workers=2)
    assert workers.ids == alone.ids == [f"s{i:07d}" for i in range(21)]
    torch.testing.assert_close(workers.z_layers, alone.z_layers, rtol=0, atol=0)
