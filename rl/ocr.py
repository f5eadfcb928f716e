"""OCR engines behind one interface, for the text-rendering reward (RL.md §3).

`OcrEngine.read(images)` takes RGB uint8 arrays [H, W, 3] and returns the recognised text of each
image (all detected lines joined by spaces; "" when nothing is found). Both engines run the same
PP-OCR model family and both expect BGR arrays (the OpenCV convention), so the conversion happens
here, once, and callers always hand over RGB.

- `RapidOcrEngine`: `rapidocr` + `onnxruntime`. The wheel ships the PP-OCR det/rec/cls ONNX
  models; we pass their paths explicitly so RapidOCR never reaches its download code, and we check
  that the recogniser carries its character table (otherwise RapidOCR would fetch a dictionary).
- `PaddleOcrEngine`: PaddleOCR 3.x (the optional `paddle` extra). It downloads models unless it is
  given local directories, so the directories are required, checked before the import, and the
  package is imported only when this engine is built.
- `RecognizerLikelihood`: the probability RapidOCR's recogniser gives a target string on an image
  (CTC over its per-time-step character probabilities), the dense `ocr_ctc` reward component;
  `RapidOcrEngine.likelihood` serves it (engines with `supports_likelihood`).
- `build_ocr_engine`: `auto` picks PaddleOCR when its model directories are configured and the
  package imports, else RapidOCR, and logs the choice.

Engines are not thread-safe and hold a few hundred MB; the actor pool (`rl.actors`) gives each Ray
actor its own engine, which is also why the default is one ONNX thread per engine.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np

from lance_model.configio import PositiveInt, check_types, configclass

log = logging.getLogger(__name__)

EngineKind = Literal["auto", "rapidocr", "paddleocr"]
ENGINE_KINDS: tuple[str, ...] = EngineKind.__args__


class OcrError(RuntimeError):
    """An OCR engine failed on an input (the reward treats the image as unreadable)."""


class OcrEngineUnavailable(ValueError):
    """An OCR engine cannot be built here: a package or a model file/directory is missing (a setup
    error the user fixes in the config or the environment, reported in one line by the CLI)."""


@configclass
class OcrConfig:
    engine: EngineKind = "auto"  # auto | rapidocr | paddleocr
    threads: PositiveInt = 1  # intra-op threads per engine (one engine per actor, one actor per CPU)
    use_angle_cls: bool = False  # rendered text is upright: the angle classifier only costs time
    # RapidOCR: ONNX model files; None = the PP-OCR models shipped inside the rapidocr wheel.
    rapid_det_model: str | None = None
    rapid_rec_model: str | None = None
    rapid_cls_model: str | None = None
    rapid_rec_keys: str | None = None  # character table, for a rec model without one embedded
    # PaddleOCR 3.x: local model directories (required: PaddleOCR downloads otherwise).
    paddle_det_model_dir: str | None = None
    paddle_rec_model_dir: str | None = None
    paddle_det_model_name: str | None = None  # e.g. PP-OCRv5_server_det (None: PaddleOCR's default)
    paddle_rec_model_name: str | None = None
    paddle_device: str = "cpu"

    def validate(self, prefix: str = "reward.ocr") -> OcrConfig:
        """Types and ranges (also of an OcrConfig built in code): as when the config is loaded."""
        check_types(self, prefix + ".")
        return self


def rgb_to_bgr(image: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> contiguous BGR (what OpenCV-based engines read)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise OcrError(f"expected an RGB image [H, W, 3]; got shape {tuple(image.shape)}")
    return np.ascontiguousarray(image[..., ::-1])


class OcrEngine:
    """Reads the text in RGB uint8 images. Subclasses implement `_read_bgr` for one image."""

    name = "ocr"
    supports_likelihood = False  # True when `likelihood` is implemented (the dense `ocr_ctc` reward)

    def read(self, images: list[np.ndarray]) -> list[str]:
        """Recognised text per image, lines joined by spaces. Raises `OcrError` if any image fails
        (the caller re-reads one at a time to find which)."""
        out = []
        for image in images:
            try:
                out.append(self._read_bgr(rgb_to_bgr(np.asarray(image, dtype=np.uint8))))
            except OcrError:
                raise
            except Exception as exc:  # engine internals raise anything
                raise OcrError(f"{self.name} failed on a {tuple(np.shape(image))} image: {exc}") from exc
        return out

    def _read_bgr(self, image: np.ndarray) -> str:
        raise NotImplementedError

    def likelihood(self, images: list[np.ndarray], targets: list[str]) -> list[float]:
        """Per-character probability the recogniser gives each target in its image (see
        `RecognizerLikelihood`). Raises `OcrError` if it fails on any image."""
        raise NotImplementedError(f"the {self.name} engine has no recogniser likelihood")


# ------------------------------------------------------------------------------------ RapidOCR
def rapidocr_model_dir() -> Path:
    try:
        import rapidocr
    except ImportError as exc:
        raise OcrEngineUnavailable("RapidOCR is not installed: pip install rapidocr onnxruntime") from exc
    return Path(rapidocr.__file__).resolve().parent / "models"


def _shipped_model(models: Path, kind: str) -> Path:
    """The model of `kind` (det/rec/cls) that the rapidocr wheel ships."""
    pattern = {"det": "*_det_*.onnx", "rec": "*_rec_*.onnx", "cls": "*_cls_*.onnx"}[kind]
    found = sorted(models.glob(pattern))
    if not found:
        raise OcrEngineUnavailable(f"no shipped RapidOCR {kind} model ({pattern}) in {models}; set "
                                   f"reward.ocr.rapid_{kind}_model to a local ONNX file")
    return found[-1]


def _has_character_table(model: Path) -> bool:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return "character" in session.get_modelmeta().custom_metadata_map


class RapidOcrEngine(OcrEngine):
    """RapidOCR with explicit local model paths: it can never take its download branch."""

    name = "rapidocr"

    def __init__(self, config: OcrConfig | None = None) -> None:
        cfg = (config or OcrConfig()).validate()
        try:
            from rapidocr import RapidOCR
        except ImportError as exc:
            raise OcrEngineUnavailable("RapidOCR is not installed: pip install rapidocr onnxruntime") from exc
        models = rapidocr_model_dir()
        paths = {}
        for kind in ("det", "rec", "cls"):
            given = getattr(cfg, f"rapid_{kind}_model")
            path = Path(given) if given else _shipped_model(models, kind)
            if not path.is_file():
                raise OcrEngineUnavailable(f"reward.ocr.rapid_{kind}_model={given!r}: file not found")
            paths[kind] = path
        params = {
            "Global.log_level": "error", "Global.use_cls": cfg.use_angle_cls,
            "Det.model_path": str(paths["det"]), "Rec.model_path": str(paths["rec"]),
            "Cls.model_path": str(paths["cls"]),
            "EngineConfig.onnxruntime.intra_op_num_threads": cfg.threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        if cfg.rapid_rec_keys:
            if not Path(cfg.rapid_rec_keys).is_file():
                raise OcrEngineUnavailable(f"reward.ocr.rapid_rec_keys={cfg.rapid_rec_keys!r}: file not found")
            params["Rec.rec_keys_path"] = cfg.rapid_rec_keys
        elif not _has_character_table(paths["rec"]):
            raise OcrEngineUnavailable(f"{paths['rec']} has no embedded character table and RapidOCR would "
                                       "download one; set reward.ocr.rapid_rec_keys to a local dictionary file")
        self._ocr = RapidOCR(params=params)
        self.models = paths
        self._likelihood: RecognizerLikelihood | None = None
        if not cfg.rapid_rec_keys:  # the likelihood reads the table embedded in the rec model
            self._likelihood = RecognizerLikelihood(paths["rec"], cfg.threads)
        self.supports_likelihood = self._likelihood is not None

    def likelihood(self, images: list[np.ndarray], targets: list[str]) -> list[float]:
        if self._likelihood is None:
            return super().likelihood(images, targets)
        try:
            return self._likelihood.score([np.asarray(im, dtype=np.uint8) for im in images], list(targets))
        except (ValueError, OcrError):
            raise
        except Exception as exc:  # onnxruntime / OpenCV internals raise anything
            raise OcrError(f"{self.name} likelihood failed on {len(images)} image(s): {exc}") from exc

    def _read_bgr(self, image: np.ndarray) -> str:
        result = self._ocr(image)
        texts = getattr(result, "txts", None)
        return " ".join(texts) if texts else ""


class RecognizerLikelihood:
    """How likely the PP-OCR *recogniser* finds a target string in an image: its CTC probability.

    The image is treated as one text line: resized to the recogniser's input height (48) keeping
    its aspect ratio (width capped at 320 = 40 time steps), normalised and right-padded exactly as
    RapidOCR prepares a detected line. The recogniser gives per-time-step character probabilities;
    with each letter's upper and lower case merged into one class (the OCR reward ignores case),
    and the space merged into the CTC blank (it ignores whitespace), the CTC forward algorithm
    (`torch.nn.functional.ctc_loss`) sums the probability of every alignment of the normalised
    target. `score` returns its per-character geometric mean, exp(log P / len(target)) in [0, 1]:
    about 1 for a clean rendering of the target, orders of magnitude lower for another word or
    noise, and never exactly 0, so it ranks images the text reward scores equally (all 0).
    Characters the recogniser's table lacks make the probability 0.
    """

    HEIGHT, MAX_WIDTH = 48, 320

    def __init__(self, model: Path, threads: int = 1) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "character" not in meta:
            raise OcrEngineUnavailable(f"{model} has no embedded character table: the CTC likelihood needs one")
        # Output classes: 0 = CTC blank, 1..n = the table, n + 1 = space (PaddleOCR's CTC layout).
        table = meta["character"].splitlines()
        self.space_index = len(table) + 1
        self.classes: dict[str, list[int]] = {}
        for i, char in enumerate(table, 1):
            if len(char) == 1:
                self.classes.setdefault(char.lower(), []).append(i)
        self.input_name = self.session.get_inputs()[0].name

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        import cv2

        h, w = image.shape[:2]
        width = min(self.MAX_WIDTH, max(1, math.ceil(self.HEIGHT * w / h)))
        resized = cv2.resize(rgb_to_bgr(image), (width, self.HEIGHT)).astype(np.float32)
        out = np.zeros((3, self.HEIGHT, self.MAX_WIDTH), dtype=np.float32)
        out[:, :, :width] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
        return out

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """Per-time-step class probabilities [N, T, classes] of RGB uint8 images."""
        batch = np.stack([self._prepare(np.asarray(im, dtype=np.uint8)) for im in images])
        return self.session.run(None, {self.input_name: batch})[0]

    def score(self, images: list[np.ndarray], targets: list[str]) -> list[float]:
        """Per-character CTC probability of each (normalised) target in its image."""
        import torch

        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        if not images:
            return []
        probs = self.probabilities(images)
        scores = []
        for p, target in zip(probs, targets):
            text = "".join(target.lower().split())
            if not text:
                raise ValueError(f"empty target text {target!r}")
            if any(c not in self.classes for c in text):
                scores.append(0.0)
                continue
            distinct = sorted(set(text))
            columns = [p[:, 0] + p[:, self.space_index]] + [p[:, self.classes[c]].sum(axis=1) for c in distinct]
            log_probs = torch.from_numpy(np.log(np.maximum(np.stack(columns, axis=1), 1e-30))).double()
            labels = torch.tensor([[distinct.index(c) + 1 for c in text]])
            nll = torch.nn.functional.ctc_loss(log_probs[:, None, :], labels, torch.tensor([p.shape[0]]),
                                               torch.tensor([len(text)]), blank=0, reduction="sum")
            scores.append(float(math.exp(-float(nll) / len(text))) if math.isfinite(float(nll)) else 0.0)
        return scores


# ------------------------------------------------------------------------------------ PaddleOCR
def paddle_model_dirs(cfg: OcrConfig) -> tuple[Path, Path]:
    """The configured PaddleOCR det/rec directories, checked to exist (no import)."""
    dirs = []
    for kind in ("det", "rec"):
        value = getattr(cfg, f"paddle_{kind}_model_dir")
        if not value:
            raise OcrEngineUnavailable(f"reward.ocr.paddle_{kind}_model_dir is not set: PaddleOCR needs local "
                                       "model directories (it would download them otherwise)")
        if not Path(value).is_dir():
            raise OcrEngineUnavailable(f"reward.ocr.paddle_{kind}_model_dir={value!r}: directory not found")
        dirs.append(Path(value))
    return dirs[0], dirs[1]


class PaddleOcrEngine(OcrEngine):
    """PaddleOCR 3.x from local model directories; the package is imported only here."""

    name = "paddleocr"

    def __init__(self, config: OcrConfig) -> None:
        cfg = config.validate()
        det_dir, rec_dir = paddle_model_dirs(cfg)
        # PaddleX probes model hosters at import unless told not to; we never download.
        os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
        try:
            from paddleocr import PaddleOCR
        except ImportError as exc:
            raise OcrEngineUnavailable("PaddleOCR is not installed: pip install 'lance-pipelines[paddle]' "
                                       "(paddleocr + paddlepaddle), or use reward.ocr.engine=rapidocr") from exc
        self._ocr = PaddleOCR(
            text_detection_model_dir=str(det_dir), text_detection_model_name=cfg.paddle_det_model_name,
            text_recognition_model_dir=str(rec_dir), text_recognition_model_name=cfg.paddle_rec_model_name,
            use_doc_orientation_classify=False, use_doc_unwarping=False,
            use_textline_orientation=cfg.use_angle_cls, device=cfg.paddle_device)

    def _read_bgr(self, image: np.ndarray) -> str:
        texts: list[str] = []
        for page in self._ocr.predict(image) or []:
            texts.extend(page["rec_texts"] or [])
        return " ".join(texts)


# ------------------------------------------------------------------------------------ selection
def paddle_available(cfg: OcrConfig) -> str | None:
    """None when PaddleOCR can be used with `cfg`, else the reason it cannot."""
    import importlib.util

    try:
        paddle_model_dirs(cfg)
    except OcrEngineUnavailable as exc:
        return str(exc)
    if importlib.util.find_spec("paddleocr") is None:
        return "the paddleocr package is not installed"
    return None


def choose_engine(cfg: OcrConfig) -> str:
    """`rapidocr` or `paddleocr` for the configured kind (`auto` resolved, reason logged)."""
    cfg.validate()
    if cfg.engine != "auto":
        return cfg.engine
    reason = paddle_available(cfg)
    if reason is None:
        log.info("OCR engine: PaddleOCR (local models %s, %s)", cfg.paddle_det_model_dir, cfg.paddle_rec_model_dir)
        return "paddleocr"
    log.info("OCR engine: RapidOCR (PaddleOCR not used: %s)", reason)
    return "rapidocr"


def preflight(cfg: OcrConfig) -> str:
    """Resolve the engine and check its package and model files without loading it (the driver
    calls this before starting reward actors, so a setup error is one clear line, not a dead actor)."""
    import importlib.util

    kind = choose_engine(cfg)
    if kind == "paddleocr":
        reason = paddle_available(cfg)
        if reason is not None:
            raise OcrEngineUnavailable(f"reward.ocr.engine=paddleocr: {reason}")
        return kind
    if importlib.util.find_spec("rapidocr") is None or importlib.util.find_spec("onnxruntime") is None:
        raise OcrEngineUnavailable("RapidOCR is not installed: pip install rapidocr onnxruntime")
    models = rapidocr_model_dir()
    for k in ("det", "rec", "cls"):
        given = getattr(cfg, f"rapid_{k}_model")
        if given and not Path(given).is_file():
            raise OcrEngineUnavailable(f"reward.ocr.rapid_{k}_model={given!r}: file not found")
        if not given:
            _shipped_model(models, k)
    return kind


def build_ocr_engine(cfg: OcrConfig | None = None) -> OcrEngine:
    cfg = cfg or OcrConfig()
    kind = choose_engine(cfg)
    return PaddleOcrEngine(cfg) if kind == "paddleocr" else RapidOcrEngine(cfg)
