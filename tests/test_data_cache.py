"""Prompt embeddings and real-image latents encoded once before the first step, into a row cache (fewstep.cache: in
memory, or safetensors shards on disk reused on resume); the text encoders freed after, yet exported."""
import gc
import json
import os
import weakref
from pathlib import Path

import pytest
import torch

from fewstep import cache
from fewstep.api import build
from fewstep.config import ConfigError, load_config
from fewstep.data import DataSource
from fewstep.teachers.load import load_teacher

PROMPTS = ["a photo of a cat", "a red dog", "an astronaut riding a horse", "blue flowers in a field"]


def _teacher(path, **kw):
    return load_teacher(path, 1.0, "float32", **kw)


def _images(folder: Path, n: int = 5, size: int = 40) -> Path:
    from PIL import Image
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
    (folder / "captions.txt").write_text("img_0.png\ta green tree\nimg_1.png\ta red dog\n")
    return folder


def _count(teacher):
    """Count text-encoder batches and VAE-encoded image batches of ``teacher``."""
    calls = {"prompts": 0, "images": 0}
    enc, img = teacher.prompt_cache._encode, teacher.encode_images
    teacher.prompt_cache._encode = lambda p: calls.__setitem__("prompts", calls["prompts"] + 1) or enc(p)
    teacher.encode_images = lambda x: calls.__setitem__("images", calls["images"] + 1) or img(x)
    return calls


def _same(a, b):
    for f in ("prompt_embeds", "pooled_embeds", "time_ids", "null_prompt_embeds", "null_pooled_embeds"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), f


# ---- the row store ------------------------------------------------------------------------------------------
def test_disk_rows_equal_memory_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_BYTES", 3 * (8 * 4 + 4 * 2))  # 3 rows a shard: rows straddle shards
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 8, generator=g), torch.randn(20, 2, 2, generator=g).bfloat16()
    chunks = [{"a": a[i:i + 7], "b": b[i:i + 7]} for i in range(0, 20, 7)]
    extra = {"null": torch.ones(1, 3)}
    mem = cache.build_rows(20, chunks, "memory", extra=extra)
    disk = cache.build_rows(20, chunks, "disk", tmp_path / "c", "fp1", extra=extra)
    assert (mem.kind, disk.kind) == ("memory", "disk")
    assert len(list((tmp_path / "c").glob("shard-*.safetensors"))) == 7
    idx = torch.tensor([19, 0, 3, 3, 11, 2])
    for store in (mem, disk):
        got = store.rows(idx)
        assert torch.equal(got["a"], a[idx]) and torch.equal(got["b"], b[idx]) and got["b"].dtype == torch.bfloat16
        assert torch.equal(store.extra["null"], extra["null"])
    reopened = cache.open_rows(tmp_path / "c", "fp1")
    assert reopened is not None and torch.equal(reopened.rows([5])["a"], a[5:6])
    assert cache.open_rows(tmp_path / "c", "fp2") is None  # another fingerprint: not this cache
    # auto: memory up to the limit, disk above it
    assert cache.build_rows(20, chunks, "auto", tmp_path / "d", "x", max_memory_bytes=20 * 40).kind == "memory"
    assert cache.build_rows(20, chunks, "auto", tmp_path / "d", "x", max_memory_bytes=20 * 40 - 1).kind == "disk"
    assert cache.build_rows(20, chunks, "auto", None, "x", max_memory_bytes=0).kind == "memory"  # no folder


def test_half_written_cache_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_BYTES", 16)
    rows = torch.arange(40.0).reshape(10, 4)

    def killed():
        yield {"x": rows[:4]}
        yield {"x": rows[4:8]}
        raise KeyboardInterrupt  # the run dies mid-write

    with pytest.raises(KeyboardInterrupt):
        cache.build_rows(10, killed(), "disk", tmp_path / "c", "fp")
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".tmp-*"))
    # a temp folder left by a kill -9 is neither read nor kept
    stale = tmp_path / ".tmp-c-99999"
    stale.mkdir()
    (stale / "shard-00000.safetensors").write_bytes(b"half")
    assert cache.open_rows(tmp_path / "c", "fp") is None
    store = cache.build_rows(10, [{"x": rows}], "disk", tmp_path / "c", "fp")
    assert not stale.exists() and torch.equal(store.rows([9])["x"], rows[9:])
    # a cache without its index, or with a shard cut short, is incomplete
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-4])
    assert cache.open_rows(tmp_path / "c", "fp") is None
    shard.write_bytes(data)
    assert cache.open_rows(tmp_path / "c", "fp") is not None
    (tmp_path / "c" / "index.json").unlink()
    assert cache.open_rows(tmp_path / "c", "fp") is None


def test_bad_cache_mode_is_one_line(tiny_pipelines, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match=r"^data.cache must be one of auto, memory, disk, got 'ram'$"):
        load_config("configs/sd15_dmd2.yaml", ["data.cache=ram"])
    with pytest.raises(ConfigError, match="data.cache_memory_mb must be a number of megabytes >= 0, got -1"):
        load_config("configs/sd15_dmd2.yaml", ["data.cache_memory_mb=-1"])
    with pytest.raises(ValueError, match="data.cache=disk needs a cache folder"):
        cache.RowWriter(3, "disk")


# ---- prompt embeddings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_prompt_cache_disk_equals_memory_and_is_reused(family, tiny_pipelines, prompts_file, tmp_path):
    lazy = _teacher(tiny_pipelines[family])
    ref = lazy.conditions_for_prompts(PROMPTS)  # today's path: encoded per batch, on demand
    mem, disk = _teacher(tiny_pipelines[family]), _teacher(tiny_pipelines[family])
    mem.prepare_conditions(DataSource(prompts_file, cache="memory"))
    calls = _count(disk)
    disk.prepare_conditions(DataSource(prompts_file, cache="disk", cache_dir=str(tmp_path)))
    assert calls["prompts"] == 1 and (tmp_path / "prompts" / "index.json").is_file()
    assert mem.prompt_cache.store.kind == "memory" and disk.prompt_cache.store.kind == "disk"
    order = [PROMPTS[i] for i in (2, 0, 0, 3, 1)]
    a, b = mem.conditions_for_prompts(order), disk.conditions_for_prompts(order)
    _same(a, b)
    lazy_rows = lazy.conditions_for_prompts(order)
    for f in ("prompt_embeds", "pooled_embeds", "time_ids", "null_prompt_embeds", "null_pooled_embeds"):
        if getattr(a, f) is not None:
            assert torch.allclose(getattr(a, f), getattr(lazy_rows, f), atol=1e-5), f
    assert len(ref) == 4
    # the same prompts, teacher and resolution: a resumed run reads the cache and encodes nothing
    again = _teacher(tiny_pipelines[family])
    calls = _count(again)
    again.prepare_conditions(DataSource(prompts_file, cache="disk", cache_dir=str(tmp_path)))
    assert calls["prompts"] == 0
    _same(again.conditions_for_prompts(order), b)
    # other prompts: another fingerprint, the cache is rebuilt
    other = tmp_path / "other.txt"
    other.write_text("\n".join(PROMPTS + ["a yellow submarine"]) + "\n")
    fresh = _teacher(tiny_pipelines[family])
    calls = _count(fresh)
    fresh.prepare_conditions(DataSource(str(other), cache="disk", cache_dir=str(tmp_path)))
    assert calls["prompts"] == 1 and len(fresh.prompt_cache.store) == 5
    assert json.loads((tmp_path / "prompts" / "index.json").read_text())["rows"] == 5


def test_prompt_sampling_is_unchanged(tiny_pipelines, prompts_file):
    """The batch's prompts are drawn exactly as before (same generator calls): seeds and resume stay as they were."""
    t = _teacher(tiny_pipelines["sd15"])
    data = DataSource(prompts_file)
    before = t.sample_conditions(6, torch.Generator().manual_seed(3), data)  # lazy: not prepared
    g = torch.Generator().manual_seed(3)
    expect = [data.prompts[i] for i in torch.randint(len(data.prompts), (6,), generator=g).tolist()]
    t2 = _teacher(tiny_pipelines["sd15"])
    t2.prepare_conditions(DataSource(prompts_file, free_text_encoders=True))
    after = t2.sample_conditions(6, torch.Generator().manual_seed(3), data)
    assert torch.allclose(before.prompt_embeds, after.prompt_embeds, atol=1e-5)
    assert torch.allclose(after.prompt_embeds, t.conditions_for_prompts(expect).prompt_embeds, atol=1e-5)


def test_freed_text_encoders_serve_cached_prompts_only(tiny_pipelines, prompts_file):
    t = _teacher(tiny_pipelines["sdxl"])
    ref = weakref.ref(t.pipe.text_encoder_2)
    t.prepare_conditions(DataSource(prompts_file, free_text_encoders=True))
    assert t.pipe.text_encoder is None and t.pipe.text_encoder_2 is None
    gc.collect()
    assert ref() is None  # gone from memory, not only from the pipeline
    assert t.freed_components == {"text_encoder": ("transformers", "CLIPTextModel"),
                                  "text_encoder_2": ("transformers", "CLIPTextModelWithProjection")}
    assert len(t.conditions_for_prompts(["a red dog"])) == 1
    with pytest.raises(ValueError, match="prompt 'a blue whale' was not encoded before the text encoders were freed"):
        t.conditions_for_prompts(["a red dog", "a blue whale"])


def test_exported_encoders_reload_with_variant(tiny_pipelines, tmp_path):
    """A teacher loaded with a variant: the export reloads each freed encoder (revision, variant, dtype) and saves
    it, instead of copying files that a plain from_pretrained would not find."""
    from diffusers import DiffusionPipeline
    from transformers import CLIPTextModel

    src = tmp_path / "variant"
    DiffusionPipeline.from_pretrained(tiny_pipelines["sd15"]).save_pretrained(str(src), variant="fp16")
    t = _teacher(str(src), variant="fp16")
    want = {k: v.clone() for k, v in t.pipe.text_encoder.state_dict().items()}
    t.free_text_encoders()
    out = tmp_path / "out"
    type(t.pipe)(**t.pipe.components).save_pretrained(str(out))
    assert json.loads((out / "model_index.json").read_text())["text_encoder"] == [None, None]
    t.save_freed_components(out)
    assert json.loads((out / "model_index.json").read_text())["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert (out / "text_encoder" / "model.safetensors").is_file()
    got = CLIPTextModel.from_pretrained(str(out / "text_encoder")).state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


# ---- image latents ------------------------------------------------------------------------------------------
def test_latent_cache_disk_equals_memory_reused_and_rebuilt(tiny_pipelines, tmp_path):
    images = _images(tmp_path / "imgs")
    mem, disk = _teacher(tiny_pipelines["sd15"]), _teacher(tiny_pipelines["sd15"])
    mem.prepare_real_samples(DataSource(images=str(images), cache="memory"))
    calls = _count(disk)
    disk.prepare_real_samples(DataSource(images=str(images), cache="disk", cache_dir=str(tmp_path / "c")))
    assert calls["images"] == 1 and disk._real.kind == "disk" and mem._real.kind == "memory"
    idx = torch.tensor([4, 0, 2, 2])
    a, b = mem._real.rows(idx)["latents"], disk._real.rows(idx)["latents"]
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert disk._real_prompts[:2] == ["a green tree", "a red dog"]
    # real_samples draws the same indices from the same generator, and reads only those rows
    x_m, c_m = mem.real_samples(3, torch.Generator().manual_seed(1))
    x_d, c_d = disk.real_samples(3, torch.Generator().manual_seed(1))
    assert torch.equal(x_m, x_d)
    _same(c_m, c_d)
    # a resumed run: reused, nothing encoded
    again = _teacher(tiny_pipelines["sd15"])
    calls = _count(again)
    again.prepare_real_samples(DataSource(images=str(images), cache="disk", cache_dir=str(tmp_path / "c")))
    assert calls["images"] == 0 and torch.equal(again._real.rows(idx)["latents"], a)
    # another resolution or a changed image: another fingerprint, rebuilt
    small = _teacher(tiny_pipelines["sd15"])
    small.set_resolution(24)
    calls = _count(small)
    small.prepare_real_samples(DataSource(images=str(images), cache="disk", cache_dir=str(tmp_path / "c")))
    assert calls["images"] == 1 and small._real.rows([0])["latents"].shape[-1] == 12
    st = os.stat(images / "img_3.png")
    os.utime(images / "img_3.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = _teacher(tiny_pipelines["sd15"])
    calls = _count(changed)
    changed.prepare_real_samples(DataSource(images=str(images), cache="disk", cache_dir=str(tmp_path / "c")))
    assert calls["images"] == 1


# ---- a run: prepare, free, train, resume, export --------------------------------------------------------------
def _run(path, prompts_file, images, out, steps):
    from fewstep.trainer import Trainer

    cfg = load_config("configs/sdxl_dmd2.yaml", [
        f"teacher.path={path}", "teacher.dtype=float32", "student.steps=2", "objective.gan_weight=0.1",
        "objective.critic_steps=1", f"data.images={images}", f"data.prompts={prompts_file}", "data.cache=disk",
        f"train.max_steps={steps}", "train.batch_size=2", "train.mixed_precision=no", "train.checkpoint_every=2",
        "train.sample_every=0", "train.tracker=none", "train.progress=none", f"output_dir={out}",
        "train.gradient_checkpointing=false"])  # not what this test is about
    teacher, data, obj = build(cfg)
    assert data.free_text_encoders and data.cache_dir == str(out / "cache")  # the defaults a run gets
    calls = _count(teacher)
    tr = Trainer(cfg, teacher, obj, data, out, log=lambda *a: None)
    tr.fit()
    return tr, teacher, obj, calls


def test_run_frees_encoders_resumes_from_cache_and_exports(tiny_pipelines, prompts_file, tmp_path):
    from diffusers import DiffusionPipeline

    images = _images(tmp_path / "imgs", size=64)
    out = tmp_path / "run"
    tr, teacher, obj, calls = _run(tiny_pipelines["sdxl"], prompts_file, images, out, 2)
    assert calls == {"prompts": 1, "images": 1}  # every prompt and every image encoded once, before the first step
    assert teacher.pipe.text_encoder is None and teacher.pipe.text_encoder_2 is None
    assert teacher.pipe.vae is None and data_vae_freed(teacher)  # data.free_vae (default): latents cached, VAE gone
    assert tr.step == 2 and (out / "cache" / "prompts" / "index.json").is_file()
    assert (out / "cache" / "latents" / "index.json").is_file()
    assert set(teacher.prompt_cache._rows) == set(PROMPTS) | {"a green tree", "a red dog", "img 2", "img 3", "img 4"}
    tr.end()
    # resume: both caches reused, nothing encoded again
    tr, teacher, obj, calls = _run(tiny_pipelines["sdxl"], prompts_file, images, out, 3)
    assert calls == {"prompts": 0, "images": 0} and tr.step == 3
    assert teacher.pipe.text_encoder is None
    # the export carries the text encoders again, and the stock pipeline runs its default call
    folder = Path(teacher.save_student(tr.final_student(), obj, out / "pipeline")["pipeline"])
    tr.end()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is not None and pipe.text_encoder_2 is not None
    img = pipe("a red dog", num_inference_steps=2, guidance_scale=0.0, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert img.shape[0] == 1 and bool(torch.isfinite(torch.as_tensor(img)).all())
    src = DiffusionPipeline.from_pretrained(tiny_pipelines["sdxl"])
    sd = src.text_encoder_2.state_dict()
    assert all(torch.equal(pipe.text_encoder_2.state_dict()[k], v) for k, v in sd.items())
    assert all(torch.equal(pipe.vae.state_dict()[k], v) for k, v in src.vae.state_dict().items())


def data_vae_freed(teacher) -> bool:
    return teacher.freed_components.get("vae") == ("diffusers", "AutoencoderKL")


def test_freed_vae_decodes_the_same_and_is_kept_when_it_cannot_come_back(tiny_pipelines, tmp_path):
    """data.free_vae: after free_vae the pipeline holds no VAE (gone from memory); previews load it for their decode
    and give the same images; a teacher whose source cannot give the VAE back keeps it."""
    t = _teacher(tiny_pipelines["sdxl"])
    x0 = torch.randn(2, *t.sample_shape, generator=torch.Generator().manual_seed(0))
    before = t.to_images(x0)
    ref = weakref.ref(t.pipe.vae)
    assert t.free_vae() is True
    gc.collect()
    assert t.pipe.vae is None and ref() is None and data_vae_freed(t)
    assert t.prompt_cache.encoder_available  # the text encoders are still there: any prompt can be encoded
    after = t.to_images(x0)
    assert after.shape == before.shape and torch.equal(after, before)
    assert t.pipe.vae is None  # loaded for the decode only
    assert t.free_vae() is False  # nothing left to free
    kept = _teacher(tiny_pipelines["sdxl"])
    kept.source = str(tmp_path / "gone")  # a folder without the VAE: it could not be reloaded
    assert kept.free_vae() is False and kept.pipe.vae is not None


def test_free_vae_off_keeps_the_vae(tiny_pipelines, prompts_file, tmp_path):
    from fewstep.trainer import Trainer

    cfg = load_config("configs/sd15_dmd2.yaml", [
        f"teacher.path={tiny_pipelines['sd15']}", "teacher.dtype=float32", "student.steps=1", "data.free_vae=false",
        f"data.prompts={prompts_file}", "train.max_steps=1", "train.batch_size=1", "train.mixed_precision=no",
        "train.tracker=none", "train.progress=none", f"output_dir={tmp_path / 'run'}", "train.sample_every=0"])
    teacher, data, obj = build(cfg)
    assert data.free_vae is False
    tr = Trainer(cfg, teacher, obj, data, tmp_path / "run", log=lambda *a: None)
    tr._prepare_real("none")
    assert teacher.pipe.vae is not None and "vae" not in teacher.freed_components
    tr.end()
