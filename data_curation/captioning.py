"""The captioning stage: a new caption per image / clip from an understanding model (optional).

`CaptionStage` is a callable class that Ray Data runs as an actor pool (`map_batches` with
`compute=ActorPoolStrategy`), so each actor loads its model once. It sits in pass 2 between
`PrepareStage` and the encoders: it reads the item's VAE copy (`target_vae_in`, uint8 frames
[F, H, W, 3]), scales it down to at most `max_area` pixels, keeps at most `max_frames` frames of a
video (spread over the clip), and asks the model for a caption, `batch_size` items per call.

Models (`captioning.model`), both read from a local directory (`captioning.path`), greedy:
- `lance`: a Lance checkpoint's own x2t path (`LanceGenerator`: ViT tokens of the frames, the
  prompt as the user text, KV-cached greedy decoding to `<|im_end|>` or `max_new_tokens`);
- `qwen25vl`: a Qwen2.5-VL checkpoint through transformers (its processor and chat template).

The new caption replaces `caption` (so it is what `TokenizeStage` tokenizes), the original goes to
`caption_original`, and `caption_model` records `<model>:<path>`. Rows of other tasks, and rows
already rejected, pass through unchanged (both columns null). A model that returns an empty caption
quarantines the item as `empty_generated_caption` rather than training it on an empty prompt.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_curation.config import CaptionConfig

log = logging.getLogger(__name__)

CAPTION_COLUMNS = ("caption_original", "caption_model")


def caption_frames(frames: np.ndarray, max_area: int, max_frames: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [T, 3, H', W'] in [0, 1]: at most `max_frames` frames spread
    uniformly over the clip, scaled down (aspect kept) to at most `max_area` pixels."""
    if len(frames) > max_frames:
        frames = frames[np.round(np.linspace(0, len(frames) - 1, max_frames)).astype(np.int64)]
    x = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[2], x.shape[3]
    if h * w > max_area:
        scale = (max_area / (h * w)) ** 0.5
        size = (max(1, int(h * scale)), max(1, int(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x


def _device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus and torch.cuda.is_available() else torch.device("cpu")


class LanceCaptioner:
    """A Lance checkpoint's x2t path: i2t for one frame, v2t for a clip."""

    def __init__(self, path: str, device: torch.device) -> None:
        from lance_model.generation import LanceGenerator

        dtype = torch.bfloat16 if device.type == "cuda" else None
        self.generator = LanceGenerator.from_pretrained(path, device=device, dtype=dtype)

    def caption(self, clips: list[torch.Tensor], prompts: list[str], max_new_tokens: int,
                batch_size: int) -> list[str]:
        from lance_model.generation import Request, TextOptions

        requests = [Request("v2t" if len(c) > 1 else "i2t", p, source=c) for c, p in zip(clips, prompts)]
        outputs = self.generator.generate(requests, text=TextOptions(max_new_tokens=max_new_tokens),
                                          batch_size=batch_size)
        return [o.text.text.strip() for o in outputs]


class QwenCaptioner:
    """A Qwen2.5-VL checkpoint through transformers: chat template with one image or video, greedy."""

    def __init__(self, path: str, device: torch.device) -> None:
        import transformers

        self.device = device
        self.processor = transformers.AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at the end
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
        self.model.to(device).eval()

    def caption(self, clips: list[torch.Tensor], prompts: list[str], max_new_tokens: int,
                batch_size: int) -> list[str]:
        out: list[str] = []
        for a in range(0, len(clips), batch_size):
            out += self._caption(clips[a:a + batch_size], prompts[a:a + batch_size], max_new_tokens)
        return out

    @torch.no_grad()
    def _caption(self, clips: list[torch.Tensor], prompts: list[str], max_new_tokens: int) -> list[str]:
        texts, images, videos = [], [], []
        for clip, prompt in zip(clips, prompts):
            pixels = (clip * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [T, H, W, 3]
            kind = "video" if len(pixels) > 1 else "image"
            if kind == "video":
                videos.append(pixels[: len(pixels) - len(pixels) % 2])  # the ViT pairs frames in time
            else:
                images.append(pixels[0])
            message = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": prompt}]}]
            texts.append(self.processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True))
        inputs = self.processor(text=texts, images=images or None, videos=videos or None, padding=True,
                                return_tensors="pt").to(self.device)
        ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        made = ids[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(made, skip_special_tokens=True)]


CAPTIONERS = {"lance": LanceCaptioner, "qwen25vl": QwenCaptioner}


def captioner_tag(cfg: CaptionConfig) -> str:
    """What `caption_model` records: `<model>:<absolute path>`."""
    return f"{cfg.model}:{Path(cfg.path).resolve()}"


class CaptionStage:
    """Pass-2 batches -> the same batches with a new `caption` per captioned row, `caption_original`
    and `caption_model` (see the module docstring)."""

    def __init__(self, cfg: CaptionConfig, num_gpus: float = 0, torch_threads: int = 1) -> None:
        torch.set_num_threads(torch_threads)
        self.cfg = cfg
        self.tag = captioner_tag(cfg)
        self.model = CAPTIONERS[cfg.model](cfg.path, _device(num_gpus))
        log.info("captioning with %s", self.tag)

    def wanted(self, batch: dict[str, np.ndarray], i: int) -> bool:
        frames = batch["target_vae_in"][i]
        return (batch["status"][i] == "ok" and batch["task"][i] in self.cfg.tasks
                and frames is not None and frames.size > 0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["task"])
        caption = np.empty(n, dtype=object)
        caption[:] = list(batch["caption"])
        status, reason, detail = (np.array(batch[k], dtype=object) for k in ("status", "reason", "detail"))
        original, model = np.full(n, None, dtype=object), np.full(n, None, dtype=object)
        todo = [i for i in range(n) if self.wanted(batch, i)]
        if todo:
            clips = [caption_frames(batch["target_vae_in"][i], self.cfg.max_area, self.cfg.max_frames) for i in todo]
            prompts = [self.cfg.video_prompt if len(c) > 1 else self.cfg.prompt for c in clips]
            made = self.model.caption(clips, prompts, self.cfg.max_new_tokens, self.cfg.batch_size)
            for i, text in zip(todo, made):
                original[i], model[i] = caption[i], self.tag
                if text:
                    caption[i] = text
                else:
                    status[i], reason[i] = "quarantined", "empty_generated_caption"
                    detail[i] = f"{self.tag} wrote an empty caption"
        batch.update(caption=caption, status=status, reason=reason, detail=detail,
                     caption_original=original, caption_model=model)
        return batch
