"""`janus:<folder>` (transformers' Janus saved with save_pretrained) with `head_from`, the borrowing arguments of
load / from_model, their sources in the result JSON, and the CLI flags. The Janus checkpoint written here
holds the embedded SigLIP's own vision trunk (as Janus would before its fine-tuning), so "Janus trunk + SigLIP
head and text" must score exactly as the embedded SigLIP itself; a perturbed trunk must not."""
import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "JanusForConditionalGeneration"):   # transformers ships Janus from 4.53 on
    pytest.skip(f"transformers {transformers.__version__} has no Janus (4.53+)", allow_module_level=True)
from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessor  # noqa: E402

from siglip_dola import loading
from siglip_dola.cli import main
from siglip_dola.loading.borrowed import cli_flags
from siglip_dola.loading.embedded import EMBEDDED_DIR
from siglip_dola.loading.hub import HubUnavailableError

def embedded_vision_state() -> dict:
    """The embedded SigLIP's vision trunk under Janus's names (its head dropped, as transformers' conversion does)."""
    weights = load_file(EMBEDDED_DIR / "model.safetensors")
    return {key[len("vision_model."):].replace("self_attn.out_proj", "self_attn.projection_layer"): value
            for key, value in weights.items() if key.startswith("vision_model.") and ".head." not in key}


def write_janus(folder, perturb: float = 0.0):
    vision = json.loads((EMBEDDED_DIR / "config.json").read_text())["vision_config"]
    config = JanusConfig(
        vision_config=dict(hidden_size=vision["hidden_size"], num_hidden_layers=vision["num_hidden_layers"],
                           num_attention_heads=vision["num_attention_heads"], image_size=vision["image_size"],
                           patch_size=vision["patch_size"], hidden_act=vision["hidden_act"],
                           mlp_ratio=vision["intermediate_size"] / vision["hidden_size"],
                           num_image_tokens=(vision["image_size"] // vision["patch_size"]) ** 2, projection_dim=16),
        text_config=dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
        vq_config=dict(embed_dim=4, num_embeddings=16, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
                       num_res_blocks=1, num_patches=4, projection_dim=16, image_token_embed_dim=16))
    torch.manual_seed(0)
    janus = JanusForConditionalGeneration(config).eval()
    state = embedded_vision_state()
    if perturb:   # a stand-in for Janus's fine-tuning of the understanding encoder
        generator = torch.Generator().manual_seed(1)
        state = {k: v + perturb * v.std() * torch.randn(v.shape, generator=generator) if v.ndim == 2 else v
                 for k, v in state.items()}
    janus.model.vision_model.load_state_dict(state, strict=True)
    janus.save_pretrained(folder)
    JanusImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder, state


@pytest.fixture(scope="module")
def janus_folder(tmp_path_factory):
    return write_janus(tmp_path_factory.mktemp("janus"))


def test_janus_folder_loads_only_the_vision_tower_and_borrows_the_head(janus_folder):
    folder, state = janus_folder
    loaded = loading.load(f"janus:{folder}", device="cpu", head_from="embedded")
    assert type(loaded.model).__name__ == "JanusVisionModel"
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    assert loaded.model_id == f"janus:{folder}+head:embedded"
    assert loaded.sources == {"vision": f"janus:{folder}", "head": "embedded", "text": "embedded",
                              "logit_scale": "embedded", "logit_bias": "embedded"}
    siglip = loading.load("embedded", device="cpu")
    assert loaded.logit_scale == siglip.logit_scale and loaded.readout.head_path == "folded"
    assert torch.equal(loaded.encode_text(["a red circle"]), siglip.encode_text(["a red circle"]))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    z_final, z_layers = loaded.readout(images, layers=[6, 12, 18])
    want_final, want_layers = siglip.readout(images, layers=[6, 12, 18])   # the same trunk: SigLIP's own readout
    torch.testing.assert_close(z_final, want_final, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_layers, want_layers, atol=1e-4, rtol=1e-4)


def test_janus_without_head_from_is_refused(janus_folder):
    with pytest.raises(ValueError, match="no pooling head.*pass head_from"):
        loading.load(f"janus:{janus_folder[0]}", device="cpu")


@pytest.mark.parametrize("offline_flag", ["1", None])
def test_janus_hub_name_fails_fast_offline(offline_flag, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))   # an empty cache
    if offline_flag:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_flag)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # nothing listens on the discard port
    with pytest.raises(HubUnavailableError, match="cannot load 'deepseek-community/Janus-Pro-1B'"):
        loading.load("janus:deepseek-community/Janus-Pro-1B", device="cpu", head_from="embedded")


def test_janus_hub_name_reads_only_the_vision_shards_from_the_cache(janus_folder, tmp_path, monkeypatch):
    """A sharded checkpoint in the Hugging Face cache: only the shards holding the vision tower are needed."""
    import huggingface_hub.constants as hub_constants

    from siglip_dola.loading import hub

    commit = "0" * 40
    repo = tmp_path / "models--someone--tiny-janus"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    JanusForConditionalGeneration.from_pretrained(janus_folder[0]).save_pretrained(snapshot, max_shard_size="300KB")
    (snapshot / "preprocessor_config.json").write_bytes((janus_folder[0] / "preprocessor_config.json").read_bytes())
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"]
    vision_shards = {shard for key, shard in index.items() if key.startswith("model.vision_model.")}
    assert len(set(index.values())) > len(vision_shards) >= 1
    for shard in set(index.values()) - vision_shards:
        (snapshot / shard).unlink()   # the language model's and generator's shards are never read
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: pytest.fail("network probed despite cache"))
    loaded = loading.load("janus:someone/tiny-janus", device="cpu", head_from="embedded")
    assert loaded.model_id == "janus:someone/tiny-janus+head:embedded"
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in janus_folder[1].items())


def test_janus_prefix_rejects_other_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "multi_modality"}))
    with pytest.raises(ValueError, match="model_type='multi_modality'.*janus package"):
        loading.load(f"janus:{tmp_path}", device="cpu", head_from="embedded")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        loading.load(f"janus:{tmp_path / 'empty'}", device="cpu", head_from="embedded")


def test_from_model_borrowing_arguments(janus_folder):
    vision = loading.load(f"janus:{janus_folder[0]}", device="cpu", head_from="embedded").model
    siglip = loading.load("embedded", device="cpu")
    with pytest.raises(ValueError, match="pass head_from"):
        loading.from_model(vision)
    text = loading.from_model(vision, head_from=siglip, text_from=siglip, logit_scale=math.log(50.0), logit_bias=-3.0)
    assert text.sources["logit_scale"] == "explicit" and text.tau == pytest.approx(1 / 50) and text.logit_bias == -3.0
    assert text.sources["text"] == "embedded"
    bare = loading.from_model(vision, head_from=siglip.model, logit_scale=2.0)   # a module: its head only
    assert bare.encode_text is None and bare.sources["text"] is None and bare.sources["head"] == "SiglipModel"
    with pytest.raises(ValueError, match="logit_scale is needed: .* has no text tower"):
        loading.from_model(vision, head_from=siglip.model)
    encode = siglip.encode_text
    with pytest.raises(ValueError, match="logit_scale is needed: encode_text is a bare callable"):
        loading.from_model(vision, head_from=siglip, encode_text=encode)
    own = loading.from_model(vision, head_from=siglip, encode_text=encode, logit_scale=2.5)
    assert own.sources["text"].startswith("encode_text") and own.logit_scale == 2.5
    with pytest.raises(TypeError, match="head_from must be a model name"):
        loading.from_model(vision, head_from=3)


def _eval(tmp_path, name, *flags):
    out = tmp_path / f"{name}.json"
    code = main(["eval", "--dataset", "shapes", "--split", "test", "--limit", "24", "--no-progress", "--device", "cpu",
                 "--calibration", "none", "--n-resamples", "200", "--out", str(out), *flags])
    assert code == 0
    return json.loads(out.read_text())


def test_cli_janus_trunk_with_siglip_head_vs_siglip_itself(janus_folder, tmp_path, capsys):
    """One eval each: the unperturbed trunk scores exactly as SigLIP; a perturbed one differently."""
    siglip = _eval(tmp_path, "siglip")
    janus = _eval(tmp_path, "janus", "--model", f"janus:{janus_folder[0]}", "--head-from", "embedded")
    assert janus["model"].endswith("+head:embedded") and janus["model_sources"]["head"] == "embedded"
    assert cli_flags(janus["model"]).split() == ["--model", f"janus:{janus_folder[0]}", "--head-from", "embedded"]
    assert janus["model_sources"]["logit_scale"] == "embedded" and siglip["model_sources"]["head"] == "embedded"
    for mode in siglip["modes"]:
        assert janus["modes"][mode]["metrics"] == pytest.approx(siglip["modes"][mode]["metrics"])
    calibration = tmp_path / "calibration.json"
    janus_flags = ["--model", f"janus:{janus_folder[0]}", "--head-from", "embedded"]
    assert main(["calibrate", "--dataset", "shapes", "--split", "val", "--limit", "24", "--no-progress",
                 "--out", str(calibration), *janus_flags]) == 0
    assert json.loads(calibration.read_text())["model_sources"]["head"] == "embedded"
    calibrated = _eval(tmp_path, "calibrated", *janus_flags, "--calibration", str(calibration))
    choice = json.loads(calibration.read_text())["choice"]
    assert calibrated["chosen_mode"] == choice["mode"] and calibrated["settings"]["sources"]["mode"] == "calibration"
    tuned, _ = write_janus(tmp_path / "tuned", perturb=0.5)
    changed = _eval(tmp_path, "tuned", "--model", f"janus:{tuned}", "--head-from", "embedded")
    assert changed["layer_lens"] != siglip["layer_lens"]


def test_cli_janus_errors_name_the_flag(janus_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code = main(["eval", "--dataset", "shapes", "--limit", "4", "--out", str(tmp_path / "r.json"),
                 "--model", f"janus:{janus_folder[0]}"])
    err = capsys.readouterr().err
    assert code == 2 and "--head-from" in err and "Traceback" not in err
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    code = main(["classify", "--model", "janus:deepseek-community/Janus-Pro-7B", "--head-from", "embedded",
                 "--labels", "a,b", str(tmp_path / "red.png")])   # HF_HUB_OFFLINE=1: the cache only
    err = capsys.readouterr().err
    assert code == 2 and "cannot load 'deepseek-community/Janus-Pro-7B'" in err and "Traceback" not in err


def test_janus_dola_on_transformers_janus_equals_siglip_itself(janus_folder):
    """JanusDoLa(vlm, siglip=...) on a whole JanusForConditionalGeneration holding SigLIP's trunk: SigLIP's scores."""
    from siglip_dola.integrations.janus import JanusDoLa
    from siglip_dola.scorer import DoLaSigLIP

    vlm = JanusForConditionalGeneration.from_pretrained(janus_folder[0]).eval()
    siglip = loading.load("embedded", device="cpu")
    labels = ["a red circle", "a blue star", "a green square"]
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    with pytest.raises(ValueError, match="pass siglip="):
        JanusDoLa(vlm, labels, tau=0.01)
    got = JanusDoLa(vlm, siglip=siglip, mode="static", static_layer=12, alpha=0.1, contrast_weight=1.0).classify(pixels, labels, top_k=3)
    want = DoLaSigLIP(siglip, mode="static", static_layer=12, alpha=0.1, contrast_weight=1.0).classify(pixels, labels, top_k=3)
    for g, w in zip(got, want):
        assert [p["label"] for p in g["predictions"]] == [p["label"] for p in w["predictions"]]
        assert [p["score"] for p in g["predictions"]] == pytest.approx([p["score"] for p in w["predictions"]], abs=1e-5)
    assert all(torch.equal(before[k], v) for k, v in vlm.state_dict().items())


def test_cli_text_from_and_explicit_logit_scale(janus_folder, tmp_path):
    report = _eval(tmp_path, "text", "--model", f"janus:{janus_folder[0]}", "--head-from", "embedded",
                   "--text-from", "embedded", "--logit-scale", "3.0")
    assert report["model_sources"]["text"] == "embedded" and report["model_sources"]["logit_scale"] == "explicit"
