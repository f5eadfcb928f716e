"""The curation stages: small callable classes over numpy batches (`dict[str, np.ndarray]`).

Each stage is a pure batch transform, usable on a plain dict without Ray (the tests do that) and
composed by `pipeline.py` with `Dataset.map_batches`. CPU stages (`InspectStage`, `PrepareStage`,
`TokenizeStage`) are passed as instances, so they run as stateless Ray tasks; the encoder stages
(`VaeStage`, `VitStage`) are passed as classes, so Ray runs them in actor pools that load the model
once per actor.

- `InspectStage` (pass 1): fetch, decode, validate, score and filter each item, and hash it for
  dedup; with `scenes.enabled` a video is first cut into scenes (`data_curation.scenes`), a scene
  longer than the clip-length limit into consecutive clips (`scenes.chunk_long`), and each clip is
  inspected as an item of its own (its frame span travels to pass 2 with it). An animated image
  where the task wants a video (`VIDEO_SLOTS`) is decoded as a video; where it wants a still,
  `decode.animated_images` decides (quarantined, or its first frame kept, logged and counted in the
  row's `animated` / `dropped_frames`). It outputs small metadata rows only: a rejected item gets
  `status` + `reason`, never disappears. Any other exception one item raises is quarantined as `unexpected_error` (with the
  exception in the detail, and logged), so no single item can stop a job.
- `PrepareStage` (pass 2): fetch and decode the kept items again, choose the aspect bucket and make
  the VAE copy and the ViT copy of every slot the task needs (uint8 frames [F, H, W, 3]; a slot
  that needs no copy holds an empty [0, 0, 0, 3] array so the column stays one array type); with
  `output.store_pixels`, also `<slot>_pixels`: the bucketed copy as PNG / MP4 bytes for evaluation.
- `CaptionStage` (`data_curation.captioning`, optional): an actor pool that re-captions the rows.
- `VaeStage` / `VitStage`: encode each group of equal-shape inputs as one stacked batch (a batch
  never mixes buckets or frame counts, so nothing is padded) and store bf16 bytes + shapes.
- `TokenizeStage`: token ids of caption / question / answer with the model's tokenizer.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from data_curation.buckets import bucket_size, choose_bucket, resize_crop
from data_curation.config import SCENE_TASKS, CurationConfig, ModelRef
from data_curation.dedup import perceptual_hash
from data_curation.filters import (
    ItemStats,
    blur_score,
    filter_detail,
    filter_reason,
    motion_score,
    script_counts,
    text_density,
)
from data_curation.media import (
    Decoded,
    Fetched,
    MediaError,
    check_size,
    decode_media,
    decode_text,
    encode_pixels,
    probe_video,
)
from data_curation.scenes import chunk_scenes, detect_scenes, scene_sample_id, scene_uri
from data_curation.sources import TEXT_FIELDS, UNDERSTANDING_TASKS, Fetcher, main_slot
from lance_platform.schema import SLOTS, tensor_to_bytes

log = logging.getLogger(__name__)

EMPTY_FRAMES = np.zeros((0, 0, 0, 3), dtype=np.uint8)
EDIT_TASKS = ("i2i", "v2v")
I2V = "i2v"
# the slots each task wants as a video: an animated image there is decoded as one
VIDEO_SLOTS = {"t2v": ("target",), "i2v": ("target",), "v2v": ("target", "source"), "v2t": ("source",)}


def slot_copies(task: str, slot: str) -> tuple[bool, bool]:
    """(needs a VAE copy, needs a ViT copy) of `slot` for `task`: generated targets are VAE latents,
    understanding inputs are ViT tokens, edit sources are both (DATA.md §3), and an i2v source (the
    first frame) is a VAE latent: the clean first latent frame of the target, which the sequence
    renders with no ViT block of its own (MODEL.md §9)."""
    if slot == "target":
        return task not in UNDERSTANDING_TASKS, False
    return task in EDIT_TASKS or task == I2V, task in EDIT_TASKS or task in UNDERSTANDING_TASKS


def pack_ints(values) -> bytes:
    """An int list as int32 bytes: how shapes, grids and token ids cross Ray. (As Python lists, Ray
    turns some batches into tensor columns and others into pickled objects, which do not concatenate.)"""
    return np.asarray(values, dtype=np.int32).tobytes()


def unpack_ints(data: bytes | None) -> list[int] | None:
    return None if data is None else np.frombuffer(data, dtype=np.int32).tolist()


INT_LIST_SUFFIXES = ("_shape", "_grid", "_ids")


def _missing(value) -> bool:
    # Ray hands an all-null column of a batch back as float NaN.
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def shard_row(row: dict) -> dict:
    """A row of the encoded dataset -> a shard row (nulls restored, int lists unpacked)."""
    out = {k: None if _missing(v) else v for k, v in row.items()}
    return {k: unpack_ints(v) if k.endswith(INT_LIST_SUFFIXES) else v for k, v in out.items()}


def rows_of(batch: dict[str, np.ndarray]) -> list[dict]:
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def to_batch(rows: list[dict], columns: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for col in columns:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r.get(col) for r in rows]
        out[col] = arr
    return out


# ---------------------------------------------------------------------------------------- loading
@dataclass
class LoadedItem:
    sample_id: str
    visuals: dict[str, Decoded]
    text: dict[str, str | None]
    is_video: bool
    animated: dict[str, str] = field(default_factory=dict)  # slot -> "video" | "first_frame"

    @property
    def dropped_frames(self) -> int:
        """Frames of animated images left out to keep them stills."""
        return sum(v.dropped_frames for v in self.visuals.values())


def fetch_item(fetcher: Fetcher, item: dict) -> Fetched:
    try:
        return fetcher.fetch(item)
    except FileNotFoundError as exc:
        raise MediaError("missing_file", str(exc)) from None


def load_item(fetcher: Fetcher, item: dict, cfg: CurationConfig, span: tuple[int, int] | None = None,
              fetched: Fetched | None = None) -> LoadedItem:
    """Fetch (unless `fetched` is given) + decode + validate one item; raises MediaError with the
    quarantine reason. `span`: the frames `[start, end)` of one scene of the main video, which is
    then what is decoded and what the sample id hashes."""
    task = item["task"]
    if fetched is None:
        fetched = fetch_item(fetcher, item)
    understanding = task in UNDERSTANDING_TASKS
    max_seconds = cfg.decode.understanding_max_seconds if understanding else cfg.decode.max_seconds
    limit = cfg.checks.max_caption_chars
    caption = decode_text(fetched.text["caption"], "caption", not understanding, limit)
    # x2t: the caption is the instruction (official `caption_i`); with one, the question may be empty
    text = {"caption": caption,
            "question": decode_text(fetched.text["question"], "question", understanding and caption is None, limit),
            "answer": decode_text(fetched.text["answer"], "answer", understanding, limit)}
    main = main_slot(task)
    visuals, animated = {}, {}
    for slot, (data, kind) in fetched.media.items():
        mode = "video" if slot in VIDEO_SLOTS.get(task, ()) else cfg.decode.animated_images
        visuals[slot] = decode_media(data, kind, cfg.decode.target_fps, max_seconds, cfg.checks.max_pixels,
                                     tuple(cfg.decode.alpha_background), span if slot == main else None, mode)
        check_size(visuals[slot], cfg.checks.min_side, cfg.checks.max_side)
        if kind == "image" and (visuals[slot].duration > 0 or visuals[slot].dropped_frames):
            animated[slot] = "video" if visuals[slot].duration > 0 else "first_frame"
    if main not in visuals:
        raise MediaError("missing_media", f"task {task} needs a {main} visual")
    is_video = fetched.media[main][1] == "video" or animated.get(main) == "video"
    sample_id = fetched.sample_id() if span is None else scene_sample_id(fetched.sample_id(), *span)
    return LoadedItem(sample_id, visuals, text, is_video, animated)


def guarded(fn, item: dict, *args, **kwargs):
    """`fn(*args, **kwargs)`, with any exception other than a MediaError turned into an
    `unexpected_error` one: a reader or decoder failing in a way nobody planned for costs that
    item, not the job."""
    try:
        return fn(*args, **kwargs)
    except MediaError:
        raise
    except Exception as exc:
        log.warning("quarantined %s: unexpected %s", item.get("source_uri"), type(exc).__name__, exc_info=True)
        raise MediaError("unexpected_error", f"{type(exc).__name__}: {exc}"[:500]) from None


def guarded_load(fetcher: Fetcher, item: dict, cfg: CurationConfig, span: tuple[int, int] | None = None,
                 fetched: Fetched | None = None) -> LoadedItem:
    """`load_item` under `guarded`."""
    return guarded(load_item, item, fetcher, item, cfg, span, fetched)


def item_span(item: dict) -> tuple[int, int] | None:
    """The scene span `[start_frame, end_frame)` a pass-2 item carries (None: the whole clip)."""
    start, end = item.get("start_frame"), item.get("end_frame")
    if _missing(start) or _missing(end):
        return None
    return int(start), int(end)


def _main_text(text: dict[str, str | None]) -> str:
    """The text the caption filters judge: the caption, else the question."""
    return text["caption"] or text["question"] or ""


# ---------------------------------------------------------------------------------------- pass 1
SCENE_COLUMNS = ["start_frame", "end_frame", "start_s", "end_s"]
INSPECT_COLUMNS = ["source_uri", "fingerprint", "task", "sample_id", "status", "reason", "detail", "height",
                   "width", "num_frames", "duration", "caption_chars", "blur_score", "motion_score", "phash",
                   *SCENE_COLUMNS, "scene_index", "scene_parts", "animated", "dropped_frames"]


class InspectStage:
    """Items (source_uri, fingerprint, task, locator) -> metadata rows with status ok / quarantined /
    filtered, the filter scores and a perceptual hash. With `scenes.enabled`, a video item gives one
    row per scene, or per clip of a long scene (`source_uri` = `scenes.scene_uri`, its span in
    `start_frame`/`end_frame` and `start_s`/`end_s`, the detected scene's number in `scene_index`
    and the number of clips it was cut into in `scene_parts`), each inspected and filtered as an item
    of its own. `animated`: "video" when an animated image was decoded as a video, "first_frame"
    when one was kept as its first frame (`dropped_frames`: how many frames that left out)."""

    def __init__(self, cfg: CurationConfig) -> None:
        self.cfg = cfg
        self.fetcher = Fetcher()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return to_batch([row for item in rows_of(batch) for row in self.inspect_all(item)], INSPECT_COLUMNS)

    def inspect_all(self, item: dict) -> list[dict]:
        """The rows of one item: one, or one per scene when it is a video to split."""
        if not self.cfg.scenes.enabled or item["task"] not in SCENE_TASKS:
            return [self.inspect(item)]
        try:
            fetched = guarded(fetch_item, item, self.fetcher, item)
            main = main_slot(item["task"])
            if fetched.media.get(main, (b"", None))[1] != "video" or "source" in fetched.media:
                return [self.inspect(item, fetched=fetched)]  # a still, or an i2v clip with its own image
            data = fetched.media[main][0]
            num_frames, fps = guarded(probe_video, item, data)
            scenes = guarded(detect_scenes, item, data, self.cfg.scenes, fps, num_frames)
        except MediaError as exc:
            return [self.inspect(item, error=exc)]
        detected = len(scenes)
        if self.cfg.scenes.chunk_long:
            scenes = chunk_scenes(scenes, self.clip_seconds(), self.cfg.filters.min_seconds)
        log.debug("%s: %d scene(s), %d clip(s)", item["source_uri"], detected, len(scenes))
        rows = []
        for scene in scenes:
            part = {**item, "source_uri": scene_uri(item["source_uri"], scene)}
            rows.append({**self.inspect(part, fetched=fetched, span=(scene.start, scene.end)),
                         "start_frame": scene.start, "end_frame": scene.end,
                         "start_s": scene.start_s, "end_s": scene.end_s,
                         "scene_index": scene.index, "scene_parts": scene.parts})
        return rows

    def clip_seconds(self) -> float:
        """The longest clip a scene may be: `decode.max_seconds` (what is sampled of a generation
        video), or `filters.max_seconds` when that is set and smaller (what the filter keeps)."""
        limit = self.cfg.decode.max_seconds
        return min(limit, self.cfg.filters.max_seconds) if self.cfg.filters.max_seconds else limit

    def inspect(self, item: dict, fetched: Fetched | None = None, span: tuple[int, int] | None = None,
                error: MediaError | None = None) -> dict:
        row = {"source_uri": item["source_uri"], "fingerprint": item["fingerprint"], "task": item["task"],
               "status": "ok", "reason": None, "detail": None}
        try:
            if error is not None:
                raise error
            loaded = guarded_load(self.fetcher, item, self.cfg, span, fetched)
        except MediaError as exc:
            return {**row, "status": "quarantined", "reason": exc.reason, "detail": exc.detail}
        main = loaded.visuals[main_slot(item["task"])]
        if loaded.animated:
            row.update(animated="first_frame" if "first_frame" in loaded.animated.values() else "video",
                       dropped_frames=loaded.dropped_frames)
            if loaded.dropped_frames:
                log.info("%s: animated image kept as its first frame (%d frame(s) dropped; "
                         "decode.animated_images: first_frame)", item["source_uri"], loaded.dropped_frames)
        filters = self.cfg.filters
        stats = ItemStats(main.height, main.width, loaded.is_video, main.duration, len(_main_text(loaded.text)),
                          blur_score(main.frames), motion_score(main.frames),
                          caption_letters=script_counts(_main_text(loaded.text)) if filters.caption_scripts else {})
        row.update(sample_id=loaded.sample_id, height=stats.height, width=stats.width,
                   num_frames=len(main.frames), duration=stats.duration, caption_chars=stats.caption_chars,
                   blur_score=stats.blur, motion_score=stats.motion, phash=perceptual_hash(main.frames))
        reason = filter_reason(stats, filters)
        if reason is None and filters.text_density_on:  # OCR last, and only for items the cheap filters keep
            stats.text_density = text_density(main.frames)
            reason = filter_reason(stats, filters)
        if reason:
            row.update(status="filtered", reason=reason, detail=filter_detail(stats, filters, reason))
        return row


# ---------------------------------------------------------------------------------------- pass 2
PREPARE_COLUMNS = ["sample_id", "task", "source_uri", "status", "reason", "detail", *TEXT_FIELDS, "height",
                   "width", "num_frames", "fps", "bucket", "blur_score", "motion_score", "start_s", "end_s",
                   *[f"{s}_{c}_in" for s in SLOTS for c in ("vae", "vit")], *[f"{s}_pixels" for s in SLOTS]]


class PrepareStage:
    """Kept items -> bucketed, resized VAE / ViT copies of every slot plus the text fields."""

    def __init__(self, cfg: CurationConfig, vae_stride: int, vit_stride: int) -> None:
        self.cfg = cfg
        self.vae_stride = vae_stride
        self.vit_stride = vit_stride
        self.fetcher = Fetcher()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return to_batch([self.prepare(item) for item in rows_of(batch)], PREPARE_COLUMNS)

    def copies(self, decoded: Decoded, is_video: bool, vae: bool, vit: bool,
               bucket: str | None = None) -> tuple[str, np.ndarray, np.ndarray]:
        """(bucket, VAE copy, ViT copy) of one visual; `bucket` forces the bucket (else the nearest
        aspect ratio's). `is_video` is the item's main visual's kind: it picks the areas."""
        b = self.cfg.buckets
        bucket = bucket or choose_bucket(decoded.height, decoded.width, b.names)
        out = []
        for wanted, area, stride in ((vae and self.cfg.encode.vae, b.vae_video_area if is_video else b.vae_image_area,
                                      self.vae_stride),
                                     (vit and self.cfg.encode.vit, b.vit_video_area if is_video else b.vit_image_area,
                                      self.vit_stride)):
            out.append(resize_crop(decoded.frames, *bucket_size(bucket, area, stride)) if wanted else EMPTY_FRAMES)
        return bucket, out[0], out[1]

    def prepare(self, item: dict) -> dict:
        task = item["task"]
        row = {"sample_id": item["sample_id"], "task": task, "source_uri": item["source_uri"], "status": "ok",
               **{f"{s}_{c}_in": EMPTY_FRAMES for s in SLOTS for c in ("vae", "vit")}}
        span = item_span(item)
        if span is not None:
            row.update(start_s=float(item["start_s"]), end_s=float(item["end_s"]))
        try:
            loaded = guarded_load(self.fetcher, item, self.cfg, span)
        except MediaError as exc:  # the item changed between the two passes
            return {**row, "status": "quarantined", "reason": exc.reason, "detail": exc.detail}
        if loaded.sample_id != item["sample_id"]:
            return {**row, "status": "quarantined", "reason": "changed_during_run",
                    "detail": f"content hash {loaded.sample_id} != {item['sample_id']} from the inspect pass"}
        row.update(loaded.text)
        main = main_slot(task)
        visuals = dict(loaded.visuals)
        if task == I2V and "source" not in visuals:  # the first frame of the clip is the i2v condition
            first = visuals[main]
            visuals["source"] = Decoded(first.frames[:1], fps=0.0, source_frames=1, duration=0.0)
        main_bucket = None
        for slot in sorted(visuals, key=lambda s: s != main):  # the main visual first: it sets the bucket
            decoded = visuals[slot]
            # an i2v source takes the target's bucket and size, so its latent is the target's first frame
            bucket, vae_in, vit_in = self.copies(decoded, loaded.is_video, *slot_copies(task, slot),
                                                 bucket=main_bucket if task == I2V else None)
            if slot == main:
                main_bucket = bucket
            row[f"{slot}_vae_in"], row[f"{slot}_vit_in"] = vae_in, vit_in
            if self.cfg.output.store_pixels:
                shown = vae_in if vae_in.size else vit_in
                is_video = decoded.duration > 0  # decoded from a video (an image has no duration)
                row[f"{slot}_pixels"] = (encode_pixels(shown, is_video, decoded.fps or self.cfg.decode.target_fps)
                                         if shown.size else None)
            if slot == main:
                shown = vae_in if vae_in.size else vit_in
                row.update(bucket=bucket, height=shown.shape[1], width=shown.shape[2], num_frames=len(decoded.frames),
                           fps=decoded.fps, blur_score=blur_score(decoded.frames),
                           motion_score=motion_score(decoded.frames))
        return row


def shape_groups(column: np.ndarray) -> dict[tuple, list[int]]:
    """Row indices of the non-empty arrays of `column`, grouped by shape (one bucket + frame count)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, arr in enumerate(column):
        if arr is not None and arr.size:
            groups[tuple(arr.shape)].append(i)
    return dict(groups)


def _device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus and torch.cuda.is_available() else torch.device("cpu")


def _object_column(n: int) -> np.ndarray:
    return np.full(n, None, dtype=object)


class VaeStage:
    """`<slot>_vae_in` -> `<slot>_vae_latent` (bf16 posterior mean, normalised as the model trains on
    it, stored [t, h, w, c]) + `<slot>_vae_shape` (+ `<slot>_vae_logvar` when asked)."""

    def __init__(self, ref: ModelRef, store_logvar: bool = False, num_gpus: float = 0, torch_threads: int = 1):
        from data_curation.encoders import build_vae_encoder, model_config

        torch.set_num_threads(torch_threads)
        self.device = _device(num_gpus)
        self.vae = build_vae_encoder(model_config(ref)).to(self.device)
        if self.device.type == "cuda" and hasattr(self.vae, "model"):
            # bf16 convolutions: ~2x the fp32 throughput on the H100 (benchmarks/BENCHMARKS.md);
            # the normalisation constants stay fp32.
            self.vae.model.to(torch.bfloat16)
        if store_logvar and not hasattr(self.vae, "model"):
            raise ValueError("encode.store_logvar=true needs a VAE with a posterior (wan2.2); "
                             f"this model's VAE ({type(self.vae).__name__}) is deterministic")
        self.store_logvar = store_logvar
        params = list(self.vae.parameters())
        self.dtype = params[0].dtype if params else torch.float32

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stacked uint8 [B, F, H, W, 3] -> latents [B, C, F', H', W'] (and normalised log-variances)."""
        x = torch.from_numpy(frames).to(self.device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        latents = self.vae.encode(x)
        if not self.store_logvar:
            return latents, None
        logvar = self.vae.model.encode(x.to(self.dtype)).latent_dist.logvar.float()
        return latents, logvar + 2.0 * torch.log(self.vae.latents_inv_std)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for slot in SLOTS:
            column = batch.pop(f"{slot}_vae_in")
            latent, shape, logvar = (_object_column(len(column)) for _ in range(3))
            for idx in shape_groups(column).values():
                lat, lv = self.encode(np.stack([column[i] for i in idx]))
                for j, i in enumerate(idx):
                    t = lat[j].permute(1, 2, 3, 0)  # [C, T, H, W] -> stored [t, h, w, c]
                    latent[i], shape[i] = tensor_to_bytes(t), pack_ints(t.shape)
                    if lv is not None:
                        logvar[i] = tensor_to_bytes(lv[j].permute(1, 2, 3, 0))
            batch[f"{slot}_vae_latent"], batch[f"{slot}_vae_shape"] = latent, shape
            batch[f"{slot}_vae_logvar"] = logvar
        return batch


class VitStage:
    """`<slot>_vit_in` -> `<slot>_vit_tokens` (bf16 merged tokens [n, d]) + `_vit_shape` + `_vit_grid`
    (the tower's patch grid t, h, w)."""

    def __init__(self, ref: ModelRef, num_gpus: float = 0, torch_threads: int = 1):
        from data_curation.encoders import build_vit_encoder, model_config

        torch.set_num_threads(torch_threads)
        self.device = _device(num_gpus)
        cfg = model_config(ref)
        self.cfg = cfg.vit
        self.vit = build_vit_encoder(ref, cfg).to(self.device)
        if self.device.type == "cuda":
            self.vit = self.vit.to(torch.bfloat16)

    def encode(self, frames: np.ndarray) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Stacked uint8 [B, F, H, W, 3] -> B token tensors [n, d] and their grids."""
        from lance_model.encoders.vit import encode_vit, vit_patches

        patches, grids = zip(*(vit_patches(torch.from_numpy(f).permute(0, 3, 1, 2).float() / 255.0, self.cfg)
                               for f in frames))
        tokens = encode_vit(self.vit, torch.cat(patches), torch.stack(grids))
        merge = self.cfg.spatial_merge_size ** 2
        counts = [int(g.prod()) // merge for g in grids]
        return list(tokens.float().cpu().split(counts)), [g.tolist() for g in grids]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for slot in SLOTS:
            column = batch.pop(f"{slot}_vit_in")
            tokens, shape, grid = (_object_column(len(column)) for _ in range(3))
            for idx in shape_groups(column).values():
                toks, grids = self.encode(np.stack([column[i] for i in idx]))
                for j, i in enumerate(idx):
                    tokens[i], shape[i], grid[i] = tensor_to_bytes(toks[j]), pack_ints(toks[j].shape), pack_ints(grids[j])
            batch[f"{slot}_vit_tokens"], batch[f"{slot}_vit_shape"], batch[f"{slot}_vit_grid"] = tokens, shape, grid
        return batch


class TokenizeStage:
    """caption / question / answer -> `<field>_ids` with the model's tokenizer; `record` (name,
    vocabulary size, fingerprint) goes into every shard and the manifest, so training can refuse
    ids made by another tokenizer."""

    def __init__(self, tokenizer_spec: str) -> None:
        from lance_model.tokenizer import load_tokenizer, tokenizer_record

        self.tokenizer = load_tokenizer(tokenizer_spec)
        self.record = tokenizer_record(self.tokenizer)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # an encoder that is off (encode.vae / encode.vit: false) leaves its input copies: not shard columns
        for name in [k for k in batch if k.endswith(("_vae_in", "_vit_in"))]:
            del batch[name]
        for name in TEXT_FIELDS:
            ids = _object_column(len(batch[name]))
            for i, text in enumerate(batch[name]):
                if isinstance(text, str):
                    ids[i] = pack_ints(self.tokenizer.encode(text))
            batch[f"{name}_ids"] = ids
        return nulls_as_none(batch)


def nulls_as_none(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Nulls as None again: Ray hands an all-null column back as float NaN, and a batch's NaN column
    does not concatenate with another batch's string or binary column of the same name."""
    for name, column in batch.items():
        if column.dtype.kind == "f" and column.size and np.isnan(column).all():
            batch[name] = _object_column(len(column))
        elif column.dtype == object:
            missing = [i for i, v in enumerate(column) if isinstance(v, float) and math.isnan(v)]
            if missing:
                column = column.copy()
                column[missing] = None
                batch[name] = column
    return batch
