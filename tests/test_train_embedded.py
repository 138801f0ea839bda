"""The embedded model's training script and the shipped checkpoint in siglip_dola/assets/embedded."""
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

import siglip_dola
from siglip_dola.data import shapes
from tools import train_embedded as te

EMBEDDED = Path(siglip_dola.__file__).parent / "assets" / "embedded"
TINY = dict(vision_layers=4, text_layers=1, hidden_size=32, batch_size=32, warmup_steps=5, lr=3e-3,
            logit_bias_init=-4.0)


def _embedding(output):
    """transformers 4.x returns the embedding tensor, 5.x an output object holding it as pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    tokenizer = te.build_tokenizer()
    return SiglipModel(te.build_model_config(te.TrainConfig(**TINY), len(tokenizer))).eval(), tokenizer


def test_sigmoid_loss_equals_hf_siglip_loss_with_one_positive_per_row():
    model, tokenizer = _tiny_model()
    samples = shapes.make_split("train", n=6)
    pixels = te.pixels_from_images([s.image for s in samples])
    ids = tokenizer([s.caption for s in samples], padding="max_length", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model.logit_scale.fill_(1.3)
        model.logit_bias.fill_(-2.0)
        try:
            reference = model(input_ids=ids, pixel_values=pixels, return_loss=True)
        except NotImplementedError:   # transformers < 4.4x: "SigLIP loss to be implemented"
            pytest.skip(f"transformers {transformers.__version__}'s SiglipModel has no loss to compare with")
        ours = te.sigmoid_loss(reference.image_embeds, reference.text_embeds, model.logit_scale,
                               model.logit_bias, torch.eye(6))
    torch.testing.assert_close(ours, reference.loss)


def test_sigmoid_loss_with_several_positives_matches_naive_loop():
    gen = torch.Generator().manual_seed(1)
    image_embeds, text_embeds = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    positives = (torch.rand(5, 5, generator=gen) > 0.6).float()
    scale, bias = torch.tensor(0.7), torch.tensor(-1.5)
    total = 0.0
    for i in range(5):
        for j in range(5):
            cos = F.cosine_similarity(image_embeds[i], text_embeds[j], dim=0)
            logit = cos * math.exp(0.7) - 1.5
            total += -math.log(1 / (1 + math.exp(-logit if positives[i, j] else logit)))
    got = te.sigmoid_loss(image_embeds, text_embeds, scale, bias, positives)
    assert got.item() == pytest.approx(total / 5, rel=1e-5)


def test_positive_pairs_are_the_texts_true_of_the_image():
    image = te._facts("a small red circle on a gray background")
    texts = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "circle"},
             {"size": "large", "colour": "red", "shape": "circle"}, te._facts("a small red circle on a gray background")]
    assert te.positives_matrix([image], texts).tolist() == [[1.0, 0.0, 0.0, 1.0]]


def test_shape_only_texts_name_the_shape_and_are_positive_for_every_colour_of_it():
    rng = random.Random(0)
    caption = "a large blue star on a white background"
    text, facts = te.training_text(caption, rng, shape_text_prob=1.0)
    words = set(text.replace(".", " ").split())
    assert facts == {"shape": "star"} and "star" in words and not words & set(shapes.COLOURS)
    images = [te._facts(f"a small {colour} {shape} on a gray background")
              for colour in ("red", "blue") for shape in ("star", "cross")]
    assert te.positives_matrix(images, [facts]).flatten().tolist() == [1.0, 0.0, 1.0, 0.0]


def test_default_text_mix_draws_no_shape_only_texts():
    rng = random.Random(0)
    facts = [te.training_text("a small red circle on a black background", rng)[1] for _ in range(200)]
    assert all("colour" in f for f in facts)


def test_training_record_command_reproduces_the_config(tmp_path):
    cfg = te.TrainConfig(steps=7, seed=3, lr=1.5e-4)
    te.write_training_record(tmp_path, cfg, 1.0, "test machine", note="n")
    record = json.loads((tmp_path / "training.json").read_text())
    argv = record["command"].split()[3:]                      # after "python -m tools.train_embedded"
    values = dict(zip(argv[::2], argv[1::2]))
    assert (int(values["--steps"]), int(values["--seed"]), float(values["--lr"])) == (7, 3, 1.5e-4)
    assert record["note"] == "n" and record["train_config"]["lr"] == 1.5e-4


def test_tokenizer_pads_to_max_length_with_eos_and_knows_every_class_word():
    tokenizer = te.build_tokenizer()
    ids = tokenizer(["a photo of a red triangle.", "a zebra"], padding="max_length", return_tensors="pt")
    assert list(ids.keys()) == ["input_ids"] and ids["input_ids"].shape == (2, te.MAX_TEXT_LEN)
    first = ids["input_ids"][0].tolist()
    assert first[7] == tokenizer.eos_token_id and set(first[8:]) == {tokenizer.pad_token_id}
    assert ids["input_ids"][1, 1].item() == tokenizer.unk_token_id
    words = {w for name in shapes.CLASSNAMES for w in name.split()}
    assert tokenizer.unk_token_id not in tokenizer(sorted(words))["input_ids"][0]


def test_training_pixels_match_siglip_image_processor():
    images = [s.image for s in shapes.make_split("val", n=3)]
    expected = te.build_image_processor()(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(te.pixels_from_images(images), expected)


def test_training_is_deterministic():
    cfg = te.TrainConfig(steps=3, **TINY)
    first, _, _ = te.train(cfg, log_every=0)
    second, _, _ = te.train(cfg, log_every=0)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_short_training_run_beats_chance_on_val():
    model, tokenizer, _ = te.train(te.TrainConfig(steps=60, **TINY), log_every=0)
    accuracy = te.zero_shot_accuracy(model, tokenizer, split="val", n=144)
    assert accuracy > 2.5 / len(shapes.CLASSNAMES), accuracy


def test_saved_model_loads_offline_as_fp32(tmp_path, offline):
    model, tokenizer = _tiny_model()
    te.save(model, tokenizer, tmp_path)
    loaded = SiglipModel.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert type(AutoImageProcessor.from_pretrained(tmp_path)).__name__ == "SiglipImageProcessor"
    pixels = te.pixels_from_images([s.image for s in shapes.make_split("val", n=2)])
    with torch.no_grad():
        torch.testing.assert_close(_embedding(loaded.get_image_features(pixel_values=pixels)),
                                   _embedding(model.get_image_features(pixel_values=pixels)))
    ids = AutoTokenizer.from_pretrained(tmp_path)(["a red star."], padding="max_length")["input_ids"]
    assert ids == tokenizer(["a red star."], padding="max_length")["input_ids"]


# ------------------------------------------------------------------ the shipped checkpoint
def test_shipped_checkpoint_loads_offline_with_hf_classes(offline):
    model = SiglipModel.from_pretrained(EMBEDDED).eval()
    vision = model.config.vision_config
    assert vision.num_hidden_layers == 24 and vision.vision_use_head and vision.image_size == shapes.IMAGE_SIZE
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(f.stat().st_size for f in EMBEDDED.iterdir()) < 10 * 2**20
    processor, tokenizer = AutoImageProcessor.from_pretrained(EMBEDDED), AutoTokenizer.from_pretrained(EMBEDDED)
    pixels = processor(images=[s.image for s in shapes.make_split("test", n=2)], return_tensors="pt")["pixel_values"]
    ids = tokenizer(["a red star.", "a blue cross."], padding="max_length", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert _embedding(model.get_image_features(pixel_values=pixels)).shape == (2, vision.hidden_size)
        assert _embedding(model.get_text_features(input_ids=ids)).shape == (2, vision.hidden_size)


def test_shipped_metrics_match_an_independent_final_layer_evaluation(offline):
    metrics = json.loads((EMBEDDED / "metrics.json").read_text())["zero_shot"]
    model = SiglipModel.from_pretrained(EMBEDDED).eval()
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED)
    accuracy = te.zero_shot_accuracy(model, tokenizer, split="test", n=metrics["n_test"])
    assert accuracy == pytest.approx(metrics["final_layer"]["top1"], abs=2e-3)
    assert metrics["layer_top1"]["24"] == metrics["final_layer"]["top1"]
    assert accuracy > 5 / len(shapes.CLASSNAMES)


def test_shipped_checkpoint_through_siglip_dola_load(offline):
    from siglip_dola.loading import load

    loaded = load(device="cpu")
    model = SiglipModel.from_pretrained(EMBEDDED).eval()
    assert loaded.readout.num_layers == 24
    assert loaded.tau == pytest.approx(1 / model.logit_scale.exp().item(), rel=1e-6)
    images = [s.image for s in shapes.make_split("test", n=3)]
    pixels = torch.stack([loaded.preprocess(im) for im in images])
    with torch.no_grad():
        expected = _embedding(model.get_image_features(pixel_values=te.pixels_from_images(images)))
        z_final, z_layers = loaded.readout(pixels, layers=[4, 12])
        torch.testing.assert_close(z_final, expected, atol=1e-4, rtol=1e-4)
        assert z_layers.shape == (2, 3, expected.shape[1])
        text = loaded.encode_text(["a red star."])
        ids = AutoTokenizer.from_pretrained(EMBEDDED)(["a red star."], padding="max_length", return_tensors="pt")
        torch.testing.assert_close(text, _embedding(model.get_text_features(input_ids=ids["input_ids"])))
