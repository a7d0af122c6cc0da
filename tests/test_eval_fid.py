"""FID tools on small synthetic images with local feature networks (no downloads)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.cli import main
from fewstep.data import DataError, read_prompts
from fewstep.eval.features import load_feature_extractor, save_feature_net
from fewstep.eval.fid import FeatureStats, fid, frechet_distance


class _Net(nn.Module):
    """A fixed random conv net: 16x16 RGB in [0, 1] -> 24-d features."""

    def __init__(self):
        super().__init__()
        self.input_size = 16
        self.in_channels = 3
        self.input_range = "0-1"
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 24, 3, stride=2, padding=1),
                                  nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(96, 24))

    def forward(self, x):
        return self.body(x)


def _images(n, seed, shift=0.0):
    """Smooth random uint8 images (16x16); ``shift`` brightens them (in [0, 255] units)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, 4, 4), generator=g)
    x = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False) * 180 + 20 + shift
    return x.clamp(0, 255).round().to(torch.uint8)


def _save_folder(images, folder):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def torchscript_net(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("feat") / "net.pt"
    torch.jit.script(_Net().eval()).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    ref = _images(300, seed=1)
    return {"root": root, "ref": ref, "ref_dir": str(_save_folder(ref, root / "ref")),
            "same_dist": _images(300, seed=2)}


def test_self_fid_is_zero_both_backends(torchscript_net, sets):
    ext = load_feature_extractor(torchscript_net)
    for backend in ("clean-fid", "torchmetrics"):
        r = fid(sets["ref"], sets["ref_dir"], ext, backend, progress=False)
        assert abs(r["fid"]) < 1e-6, (backend, r)
        assert r["num_images"] == 300 and r["feature_dim"] == 24


def test_fid_grows_with_shift_and_backends_agree(torchscript_net, sets):
    ext = load_feature_extractor(torchscript_net)
    ref_feats = ext(sets["ref"])
    values = []
    for shift in (0, 10, 25, 50):
        feats = ext(_images(300, seed=2, shift=shift))
        cf = frechet_distance(feats, ref_feats, "clean-fid")
        tm = frechet_distance(feats, ref_feats, "torchmetrics")
        assert abs(tm - cf) <= 0.01 * cf, (shift, cf, tm)
        # statistics (.npz route) give the same number as raw features
        assert frechet_distance(feats, FeatureStats.from_features(ref_feats), "torchmetrics") == pytest.approx(tm, rel=1e-6)
        values.append(cf)
    assert values[0] > 0
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_stats_file_reuse_and_mismatch(torchscript_net, sets, tmp_path):
    ext = load_feature_extractor(torchscript_net)
    stats = tmp_path / "ref.npz"
    a = fid(sets["same_dist"], sets["ref_dir"], ext, save_ref_stats=str(stats), progress=False)
    b = fid(sets["same_dist"], str(stats), ext, progress=False)
    c = fid(sets["same_dist"], str(stats), ext, "torchmetrics", progress=False)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-9)
    assert c["fid"] == pytest.approx(b["fid"], rel=0.01)
    loaded = FeatureStats.load(stats)
    assert loaded.num_images == 300 and loaded.feature_extractor == ext.name
    # clean-fid style statistics (mu and sigma only) load too
    np.savez(tmp_path / "cleanfid.npz", mu=loaded.mu, sigma=loaded.sigma)
    assert fid(sets["same_dist"], str(tmp_path / "cleanfid.npz"), ext, progress=False)["fid"] == pytest.approx(b["fid"])
    # statistics of another feature network are refused
    other = FeatureStats(loaded.mu, loaded.sigma, 300, "some-other-network")
    other.save(tmp_path / "other.npz")
    with pytest.raises(DataError, match="computed with feature network"):
        fid(sets["same_dist"], str(tmp_path / "other.npz"), ext, progress=False)


def test_safetensors_feature_net_and_grey_input(tmp_path, sets):
    from fewstep.eval.digits import DigitsCNN

    torch.manual_seed(0)
    net = DigitsCNN(width=8, feature_dim=16)
    save_feature_net(net, tmp_path / "cnn.safetensors", "digits_cnn", {"width": 8, "feature_dim": 16},
                     input_size=16, in_channels=1, num_classes=10)
    ext = load_feature_extractor(str(tmp_path / "cnn.safetensors"))
    feats = ext(sets["ref"])
    assert feats.shape == (300, 16) and feats.dtype == np.float64
    assert ext.logits(sets["ref"][:5]).shape == (5, 10)
    with torch.no_grad():
        x = sets["ref"][:5].float().mean(1, keepdim=True) / 255
        assert np.allclose(feats[:5], net.features(x).double().numpy(), atol=1e-5)
    # a safetensors file without fewstep metadata is refused with a clear message
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(DataError, match="metadata"):
        load_feature_extractor(str(tmp_path / "plain.safetensors"))


# ---- CLI ------------------------------------------------------------------------------------------
def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_fid_images_folder_and_precomputed_stats(torchscript_net, sets, tmp_path, capsys):
    imgs = _save_folder(_images(120, seed=3, shift=20), tmp_path / "gen")
    stats = tmp_path / "ref_stats.npz"
    code, out, err = _cli(capsys, "eval", "fid", "--ref", sets["ref_dir"], "--save-ref-stats", stats,
                          "--feature-extractor", torchscript_net, "--quiet")
    assert code == 0, err
    assert stats.is_file()
    code, out, err = _cli(capsys, "eval", "fid", "--images", imgs, "--ref", stats, "--feature-extractor",
                          torchscript_net, "--json", tmp_path / "r.json", "--quiet", "--backend", "torchmetrics")
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["fid"] > 0 and res["num_images"] == 120 and res["backend"] == "torchmetrics"
    assert "FID" in out


def test_cli_fid_pipeline_generates_with_seeds(torchscript_net, sets, tmp_path, capsys):
    from fewstep.testing import tiny_ddpm_components
    from pipelines.class_conditional import ClassConditionalPipeline

    pipe_dir = tmp_path / "pipe"
    ClassConditionalPipeline(**tiny_ddpm_components(num_class_embeds=4)).save_pretrained(str(pipe_dir))
    out = tmp_path / "gen"
    code, _, err = _cli(capsys, "eval", "fid", "--pipeline", pipe_dir, "--ref", sets["ref_dir"], "--num-images", 6,
                        "--batch-size", 4, "--steps", 2, "--seed", 10, "--feature-extractor", torchscript_net,
                        "--out", out, "--quiet", "--device", "cpu")
    assert code == 0, err
    res = json.loads((out / "fid.json").read_text())
    man = json.loads((out / "manifest.json").read_text())
    assert res["num_images"] == 6 and np.isfinite(res["fid"]) and "note" in res  # 6 images < 24 dims: warned
    assert [r["seed"] for r in man["images"]] == list(range(10, 16))
    assert [r["class_label"] for r in man["images"]] == [0, 1, 2, 0, 1, 2]
    assert man["settings"]["num_inference_steps"] == 2 and len(list(out.glob("*.png"))) == 6
    # image i depends on its own seed only: the same image alone, batch size 1
    from fewstep.eval.generate import generate, open_pipeline

    one = generate(open_pipeline(str(pipe_dir)), 1, num_inference_steps=2, seed=14, batch_size=1, progress=False,
                   class_labels=[1])
    from fewstep.data import load_images_uint8

    saved = load_images_uint8([out / "000004.png"])
    assert (one.images.int() - saved.int()).abs().max() <= 1


def test_cli_fid_diversity(torchscript_net, sets, tmp_path, capsys):
    """--diversity: precision/recall/density/coverage next to FID, from a folder or a .npz holding features."""
    fe = ["--feature-extractor", torchscript_net, "--quiet"]
    same = _save_folder(sets["same_dist"][:150], tmp_path / "same")
    code, out, err = _cli(capsys, "eval", "fid", "--images", same, "--ref", sets["ref_dir"], "--diversity",
                          "--json", tmp_path / "a.json", *fe)
    assert code == 0, err
    a = json.loads((tmp_path / "a.json").read_text())
    assert out.splitlines()[0].startswith("FID ") and out.splitlines()[1].startswith("precision ")
    assert a["precision"] > 0.8 and a["recall"] > 0.8 and a["coverage"] > 0.8, a
    assert a["diversity"]["k_pr"] == 3 and a["diversity"]["k_dc"] == 5 and a["diversity"]["num_ref"] == 300
    # statistics written with --diversity carry the features: same numbers from the .npz
    stats = tmp_path / "ref.npz"
    assert _cli(capsys, "eval", "fid", "--ref", sets["ref_dir"], "--save-ref-stats", stats, "--diversity", *fe)[0] == 0
    code, out, err = _cli(capsys, "eval", "fid", "--images", same, "--ref", stats, "--diversity", "--k-pr", 4,
                          "--diversity-max-ref", 200, "--json", tmp_path / "b.json", *fe)
    assert code == 0, err
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-6)
    assert b["diversity"]["k_pr"] == 4 and b["diversity"]["num_ref"] == 200
    # a shifted set: low precision; without --diversity the output is unchanged
    shifted = _save_folder(_images(150, seed=2, shift=60), tmp_path / "shifted")
    code, out, err = _cli(capsys, "eval", "fid", "--images", shifted, "--ref", stats, "--json", tmp_path / "c.json",
                          "--diversity", *fe)
    assert code == 0, err
    assert json.loads((tmp_path / "c.json").read_text())["precision"] < 0.5 * a["precision"]
    code, out, err = _cli(capsys, "eval", "fid", "--images", same, "--ref", stats, "--json", tmp_path / "d.json", *fe)
    assert code == 0 and "precision" not in out and "precision" not in json.loads((tmp_path / "d.json").read_text())


@pytest.mark.parametrize("case", ["npz_without_features", "bad_k", "k_too_large"])
def test_cli_fid_diversity_errors(case, torchscript_net, sets, tmp_path, capsys):
    fe = ["--feature-extractor", torchscript_net, "--quiet"]
    stats = tmp_path / "plain.npz"
    assert _cli(capsys, "eval", "fid", "--ref", sets["ref_dir"], "--save-ref-stats", stats, *fe)[0] == 0
    few = _save_folder(_images(3, seed=5), tmp_path / "few")
    args, expect = {
        "npz_without_features": (["--images", sets["ref_dir"], "--ref", stats], "hold no features"),
        "bad_k": (["--images", sets["ref_dir"], "--ref", sets["ref_dir"], "--k-dc", 0], "--k-dc must be >= 1, got 0"),
        "k_too_large": (["--images", few, "--ref", sets["ref_dir"]], "k=3 needs more than k generated samples, got 3"),
    }[case]
    code, out, err = _cli(capsys, "eval", "fid", *args, "--diversity", *fe)
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.startswith("fewstep: error:")]
    assert len(lines) == 1 and expect in lines[0], err


@pytest.mark.parametrize("case", ["missing_ref", "empty_folder", "unreadable_image", "ref_is_file", "ref_missing",
                                  "nothing_to_score", "bad_feature_file", "mixed_sizes"])
def test_cli_fid_errors(case, torchscript_net, sets, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    mixed = _save_folder(_images(2, seed=0), tmp_path / "mixed")
    from PIL import Image

    Image.new("RGB", (20, 20)).save(mixed / "zz.png")
    fe = ["--feature-extractor", torchscript_net, "--quiet"]
    args, expect = {
        "missing_ref": (["--images", sets["ref_dir"], *fe], "--ref is required"),
        "empty_folder": (["--images", empty, "--ref", sets["ref_dir"], *fe], "has no images"),
        "unreadable_image": (["--images", bad, "--ref", sets["ref_dir"], *fe], "unreadable image"),
        "ref_is_file": (["--images", sets["ref_dir"], "--ref", torchscript_net, *fe], "neither a folder"),
        "ref_missing": (["--images", sets["ref_dir"], "--ref", tmp_path / "nope", *fe], "reference not found"),
        "nothing_to_score": (["--ref", sets["ref_dir"], *fe], "nothing to score"),
        "bad_feature_file": (["--images", sets["ref_dir"], "--ref", sets["ref_dir"], "--feature-extractor",
                              tmp_path / "nope.pt"], "feature network not found"),
        "mixed_sizes": (["--images", mixed, "--ref", sets["ref_dir"], *fe], "differ in size"),
    }[case]
    code, out, err = _cli(capsys, "eval", "fid", *args)
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.startswith("fewstep: error:")]
    assert len(lines) == 1 and expect in lines[0], err


def test_prompt_readers(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    coco = {"annotations": [{"image_id": 1, "caption": "a cat on a mat"}, {"image_id": 1, "caption": "cat, mat"},
                            {"image_id": 2, "caption": "a red bus"}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(coco))
    assert read_prompts(str(tmp_path / "captions_val2017.json"), one_per_image=True) == ["a cat on a mat", "a red bus"]
    assert len(read_prompts(str(tmp_path / "captions_val2017.json"))) == 3
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    (tmp_path / "nocap.json").write_text(json.dumps({"images": []}))
    for name, msg in [("empty.txt", "has no prompts"), ("bin.txt", "cannot read prompt file"),
                      ("nocap.json", "has no prompts"), ("missing.txt", "not found"), (".", "is a folder")]:
        with pytest.raises(DataError, match=msg):
            read_prompts(str(tmp_path / name))
