"""CLIP score with a tiny CLIP built from config (offline), checked against a by-hand cosine computation."""
import json

import pytest
import torch

from fewstep.cli import main


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny transformers CLIPModel + tokenizer + CLIPImageProcessor saved to a folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from fewstep.testing import make_tokenizer

    d = tmp_path_factory.mktemp("clip")
    tok = make_tokenizer(d)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(3)
    CLIPModel(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(d))
    return str(d)


PROMPTS = ["a photo of a cat", "a red dog", "blue", "the cat in a photo", "a dog with a cat", "an red cat"]


def _by_hand(folder, images, prompts):
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pix = proc(images=list(images), return_tensors="pt")["pixel_values"]
        txt = proc(text=list(prompts), return_tensors="pt", padding=True)
        ei = model.get_image_features(pixel_values=pix)
        et = model.get_text_features(input_ids=txt["input_ids"], attention_mask=txt["attention_mask"])
    ei = getattr(ei, "pooler_output", ei)
    et = getattr(et, "pooler_output", et)
    cos = torch.nn.functional.cosine_similarity(ei, et, dim=-1)
    return float(torch.clamp(100 * cos.mean(), min=0)), cos


def test_clip_score_matches_by_hand(tiny_clip):
    from fewstep.eval.clip import CLIPScorer

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 40, 48), generator=g, dtype=torch.uint8)
    scorer = CLIPScorer(tiny_clip, batch_size=4)  # two batches
    got = scorer(images, PROMPTS)
    want, cos = _by_hand(tiny_clip, images, PROMPTS)
    assert got["num_images"] == 6
    assert got["clip_score"] == pytest.approx(want, abs=1e-3)
    assert want > 0, cos  # the fixture's seed gives a positive mean, so the clamp is not what matches


def test_cli_clip_pipeline_and_folder(tiny_clip, tiny_pipelines, prompts_file, tmp_path, capsys):
    out = tmp_path / "gen"
    code = main(["eval", "clip", "--pipeline", tiny_pipelines["sd15"], "--prompts", prompts_file, "--clip", tiny_clip,
                 "--num-images", "3", "--steps", "1", "--guidance-scale", "1", "--out", str(out), "--quiet",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0, err
    res = json.loads((out / "clip.json").read_text())
    assert res["num_images"] == 3 and 0 <= res["clip_score"] <= 100
    man = json.loads((out / "manifest.json").read_text())
    assert [r["prompt"] for r in man["images"]] == ["a photo of a cat", "a red dog", "an astronaut riding a horse"]
    # the written folder scores the same from its manifest (prompts recovered, PNGs lossless)
    code = main(["eval", "clip", "--images", str(out), "--clip", tiny_clip, "--json", str(tmp_path / "again.json")])
    assert code == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["clip_score"] == pytest.approx(res["clip_score"], abs=1e-4)


@pytest.mark.parametrize("case", ["missing_clip", "clip_not_a_model", "missing_prompts", "empty_prompts"])
def test_cli_clip_errors(case, tiny_clip, tiny_pipelines, prompts_file, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    base = ["eval", "clip", "--pipeline", tiny_pipelines["sd15"], "--quiet"]
    args, expect = {
        "missing_clip": (base + ["--prompts", prompts_file], "--clip is required"),
        "clip_not_a_model": (base + ["--prompts", prompts_file, "--clip", str(tmp_path)], "has no config.json"),
        "missing_prompts": (base + ["--clip", tiny_clip], "--prompts FILE is required"),
        "empty_prompts": (base + ["--clip", tiny_clip, "--prompts", str(tmp_path / "empty.txt")], "has no prompts"),
    }[case]
    code = main(args)
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.startswith("fewstep: error:")]
    assert code != 0 and len(lines) == 1 and expect in lines[0], err
