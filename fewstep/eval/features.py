"""Feature networks for FID: the standard Inception (clean-fid's or torch-fidelity's) or a local network.

Every extractor has one call: ``extractor(images)`` with ``images`` a uint8 tensor ``(N, 3, H, W)`` in
[0, 255] -> float64 numpy features ``(N, D)``.  Its ``name`` is written into statistics files so that
statistics computed with another network are refused instead of silently compared.

Local networks (``--feature-extractor PATH``), so FID runs offline:

* **TorchScript** (``.pt``, ``.pth``, ``.ts``, ``.jit``): ``forward(x) -> (N, D)`` features, or, for a
  classifier, ``forward(x) -> logits`` plus an exported ``features(x) -> (N, D)`` method (then class
  accuracy is available too).  ``x`` is float ``(N, C, S, S)``; optional module attributes choose the
  input: ``input_size`` (int, resize to S; default: the images' own size), ``in_channels`` (1 = grey,
  default 3), ``input_range`` (``"0-1"`` default, or ``"0-255"`` / ``"-1-1"``).
  The file ``inception-2015-12-05.pt`` (the Inception TorchScript that clean-fid downloads) is
  recognised and used exactly as clean-fid uses it.
* **safetensors** written by :func:`save_feature_net`: the weights plus, in the file's metadata, the
  architecture name (one of :data:`ARCHITECTURES`) and its constructor arguments.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import DataError

# architecture name -> "module:Class" of networks that can be stored as safetensors feature nets
ARCHITECTURES = {"digits_cnn": "fewstep.eval.digits:DigitsCNN"}
META_KEY = "fewstep_feature_net"
TORCHSCRIPT_EXTS = (".pt", ".pth", ".ts", ".jit")
CLEANFID_INCEPTION_FILE = "inception-2015-12-05.pt"


class FeatureExtractor:
    """uint8 images ``(N, 3, H, W)`` -> float64 features ``(N, D)``; see the module docstring."""

    name: str = "features"
    num_classes: int = 0  # > 0 when :meth:`logits` gives class predictions

    def __init__(self, device="cpu", batch_size: int = 64):
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _features(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _logits(self, images: Tensor) -> Tensor:
        raise ValueError(f"feature network {self.name} is not a classifier")

    @torch.no_grad()
    def _batched(self, fn, images: Tensor) -> Tensor:
        _check_images(images)
        out = [fn(images[i:i + self.batch_size]).detach().double().cpu() for i in range(0, len(images), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)

    def __call__(self, images: Tensor) -> np.ndarray:
        return self._batched(self._features, images).numpy()

    def logits(self, images: Tensor) -> Tensor:
        return self._batched(self._logits, images)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"feature extractors take uint8 images of shape (N, 3, H, W), got {got}")


class TorchFeatureNet(FeatureExtractor):
    """A local network (TorchScript or a fewstep safetensors architecture) with declared input conventions."""

    def __init__(self, net: nn.Module, name: str, input_size: Optional[int] = None, in_channels: int = 3,
                 input_range: str = "0-1", num_classes: int = 0, device="cpu", batch_size: int = 256):
        super().__init__(device, batch_size)
        if input_range not in ("0-1", "0-255", "-1-1"):
            raise DataError(f"feature network {name}: input_range must be '0-1', '0-255' or '-1-1', got {input_range!r}")
        if in_channels not in (1, 3):
            raise DataError(f"feature network {name}: in_channels must be 1 or 3, got {in_channels}")
        self.net = net.to(self.device).eval()
        self.name = name
        self.input_size = input_size
        self.in_channels = in_channels
        self.input_range = input_range
        self.num_classes = num_classes
        self._has_features = hasattr(net, "features") and callable(getattr(net, "features"))

    def preprocess(self, images: Tensor) -> Tensor:
        x = images.to(self.device).float()
        if self.in_channels == 1:
            x = x.mean(1, keepdim=True)
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        if self.input_range == "0-1":
            x = x / 255.0
        elif self.input_range == "-1-1":
            x = x / 127.5 - 1.0
        return x

    def _features(self, images: Tensor) -> Tensor:
        x = self.preprocess(images)
        out = self.net.features(x) if self._has_features else self.net(x)
        return out.flatten(1)

    def _logits(self, images: Tensor) -> Tensor:
        if not (self._has_features and self.num_classes):
            raise ValueError(f"feature network {self.name} is not a classifier")
        return self.net(self.preprocess(images))


class CleanFIDInception(FeatureExtractor):
    """clean-fid's Inception-v3 (the TF-FID TorchScript, pool3 2048-d) with clean-fid's "clean" PIL resize."""

    num_features = 2048

    def __init__(self, device="cpu", batch_size: int = 64, local_file: Optional[str] = None):
        super().__init__(device, batch_size)
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.name = "inception-v3-pool3 (clean-fid, clean resize)"
        try:
            if local_file:
                self.model = InceptionV3W(str(Path(local_file).parent), download=False).to(self.device).eval()
            else:
                import platform

                self.model = InceptionV3W("./" if platform.system() == "Windows" else "/tmp", download=True)
                self.model = self.model.to(self.device).eval()
        except Exception as e:  # offline, corrupt file, ...
            raise DataError(f"cannot load the standard Inception network for clean-fid ({_first_line(e)}); pass "
                            "--feature-extractor PATH to use a local TorchScript/safetensors feature network") from None
        self.resize = build_resizer("clean")

    def _features(self, images: Tensor) -> Tensor:
        arr = images.permute(0, 2, 3, 1).cpu().numpy()
        x = np.stack([self.resize(a) for a in arr]).transpose(0, 3, 1, 2)  # float32 in [0, 255], 299 x 299
        return self.model(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))


class TorchmetricsInception(FeatureExtractor):
    """torch-fidelity's Inception-v3 (as used by torchmetrics' FrechetInceptionDistance), 2048-d."""

    num_features = 2048

    def __init__(self, device="cpu", batch_size: int = 64):
        super().__init__(device, batch_size)
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.name = "inception-v3-pool3 (torch-fidelity)"
        try:
            self.model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).to(self.device)
        except Exception as e:
            raise DataError(f"cannot load the standard Inception network for torchmetrics ({_first_line(e)}); pass "
                            "--feature-extractor PATH to use a local TorchScript/safetensors feature network") from None

    def _features(self, images: Tensor) -> Tensor:
        return self.model(images.to(self.device))


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:200] if s else type(e).__name__


def file_digest(path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def load_feature_extractor(path: Optional[str] = None, backend: str = "clean-fid", device="cpu",
                           batch_size: int = 256) -> FeatureExtractor:
    """The standard Inception of ``backend`` (``path`` None) or the local network at ``path``."""
    if path is None:
        if backend == "clean-fid":
            return CleanFIDInception(device)
        if backend == "torchmetrics":
            return TorchmetricsInception(device)
        raise ValueError(f"unknown FID backend {backend!r}; choose clean-fid or torchmetrics")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"feature network not found: {path}")
    if p.name == CLEANFID_INCEPTION_FILE:
        return CleanFIDInception(device, local_file=str(p))
    digest = file_digest(p)
    if p.suffix in TORCHSCRIPT_EXTS:
        try:
            net = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:
            raise DataError(f"cannot load TorchScript feature network {path}: {_first_line(e)}") from None
        return TorchFeatureNet(net, f"torchscript:{p.name}:{digest}",
                               input_size=_attr(net, "input_size", None), in_channels=_attr(net, "in_channels", 3),
                               input_range=_attr(net, "input_range", "0-1"), num_classes=_attr(net, "num_classes", 0),
                               device=device, batch_size=batch_size)
    if p.suffix == ".safetensors":
        net, meta = load_feature_net(str(p))
        return TorchFeatureNet(net, f"{meta['arch']}:{p.name}:{digest}", input_size=meta.get("input_size"),
                               in_channels=meta.get("in_channels", 3), input_range=meta.get("input_range", "0-1"),
                               num_classes=meta.get("num_classes", 0), device=device, batch_size=batch_size)
    raise DataError(f"feature network {path}: expected a TorchScript file ({', '.join(TORCHSCRIPT_EXTS)}) or a "
                    ".safetensors file written by fewstep.eval.features.save_feature_net")


def _attr(net, name, default):
    try:
        v = getattr(net, name)
    except AttributeError:
        return default
    return v if isinstance(v, (int, str)) else default


def _arch_class(arch: str):
    if arch not in ARCHITECTURES:
        raise DataError(f"unknown feature-network architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    mod, cls = ARCHITECTURES[arch].split(":")
    return getattr(importlib.import_module(mod), cls)


def save_feature_net(net: nn.Module, path, arch: str, config: dict, input_size: Optional[int] = None,
                     in_channels: int = 3, input_range: str = "0-1", num_classes: int = 0, extra: Optional[dict] = None):
    """Weights as safetensors; architecture, constructor ``config`` and input conventions in the metadata."""
    from safetensors.torch import save_file

    _arch_class(arch)
    meta = {"arch": arch, "config": config, "input_size": input_size, "in_channels": in_channels,
            "input_range": input_range, "num_classes": num_classes, **(extra or {})}
    sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={META_KEY: json.dumps(meta)})


def load_feature_net(path: str):
    """``(network, metadata)`` from a file written by :func:`save_feature_net`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        sd = load_file(path)
    except Exception as e:
        raise DataError(f"cannot read feature network {path}: {_first_line(e)}") from None
    if raw is None:
        raise DataError(f"{path} has no '{META_KEY}' metadata: save feature networks with "
                        "fewstep.eval.features.save_feature_net, or pass a TorchScript file")
    meta = json.loads(raw)
    net = _arch_class(meta["arch"])(**meta.get("config", {}))
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise DataError(f"feature network {path} does not match architecture {meta['arch']}: {_first_line(e)}") from None
    return net.eval(), meta


def class_accuracy(extractor, images, labels) -> float:
    """Fraction of ``images`` (uint8) that a classifier feature network assigns to the requested ``labels``."""
    pred = extractor.logits(images).argmax(1)
    return float((pred == labels.to(pred.device)).float().mean())
