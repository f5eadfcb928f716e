"""Inference with a trained Lance: visual generation (flow sampler + CFG) and x2t text generation,
both with a KV cache (MODEL.md §7).

Visual tasks (t2i, t2v, i2v, image_edit, video_edit). Each prompt is rendered once per CFG branch:
the conditional sequence, the text-unconditional one (caption removed) and, for edits with image
guidance, the fully unconditional one (caption and visual condition removed). Everything before
the noisy target split is the branch's *prefix*: all prefixes (prompts x branches = "rows") are
packed together and run through the backbone ONCE, keeping every layer's keys/values per row
(`KVCache`). Each denoising step then runs only the target split (`<|vision_start|>`, the latent
tokens, `<|vision_end|>`) of every row: its queries see the row's cached prefix keys and the row's
own target keys (the target split is bidirectional and nothing else can see it, so the trailing
`<|im_end|>` is not needed). That is exactly the full-sequence mask, restricted to target queries.
Outside the CFG interval only the conditional rows run. The uncached path (`use_cache=False`) runs
the full packed sequences every step through `Lance.embed`/`Lance.backbone`; tests compare both.

i2v: the target's first latent frame is the VAE latent of the given image, clean (t = 0) and never
updated. Edits: the target has the source's latent size. Initial noise is drawn per prompt from
its own seeded generator, so a batch of prompts gives the same latents as one prompt at a time.

Text tasks (i2t, v2t): prefill the prompt through `assistant\\n`, then decode token by token with
the cache (greedy, or temperature + top-p with a seeded generator per prompt) until `<|im_end|>` or
the token limit; logits of ids the tokenizer cannot produce (>= len(tokenizer)) are masked.

Pixels come in as float frames [T, 3, H, W] in [0, 1]; reading/writing files is the caller's job.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import LanceConfig
from .model import Lance
from .packing import PackedBatch, pack_rendered
from .sampling import RENORM_TYPES, cfg_active, cfg_velocity, euler_step, flow_timesteps, sde_step
from .sequence import (
    UNDERSTANDING_TASKS,
    RenderedSample,
    Sample,
    SequenceBuilder,
    Split,
    Visual,
    mape_positions,
)
from .tokenizer import IM_END, Tokenizer, load_tokenizer

VISUAL_TASKS = ("t2i", "t2v", "i2v", "image_edit", "video_edit")
TEXT_TASKS = UNDERSTANDING_TASKS
TASK_ALIASES = {"x2t_image": "i2t", "x2t_video": "v2t"}
EDIT_TASKS = ("image_edit", "video_edit")
# The ViT sees an edit source at 7/8 of the VAE's side (official presets: 768 -> 672, 512 -> 448).
EDIT_VIT_SCALE = 0.875


def canonical_task(task: str) -> str:
    task = TASK_ALIASES.get(task, task)
    if task not in VISUAL_TASKS + TEXT_TASKS:
        raise ValueError(f"task={task!r}: expected one of {VISUAL_TASKS + TEXT_TASKS + tuple(TASK_ALIASES)}")
    return task


# ================================================================================= options / requests
@dataclass
class SamplerOptions:
    """Flow sampler + CFG settings (official defaults: 30 steps, shift 3.5, text CFG 4 in (0.4, 1],
    global renorm, image guidance off). `noise_level` None = ODE; a number = the RL SDE."""

    num_steps: int = 30
    shift: float = 3.5
    text_scale: float = 4.0
    image_scale: float = 1.0
    interval: tuple[float, float] | None = (0.4, 1.0)
    renorm: str = "global"
    renorm_min: float = 0.0
    noise_level: float | None = None

    def validate(self) -> SamplerOptions:
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps}: expected a positive integer")
        if self.shift <= 0:
            raise ValueError(f"shift={self.shift}: expected a positive number")
        if self.renorm not in RENORM_TYPES:
            raise ValueError(f"renorm={self.renorm!r}: expected one of {RENORM_TYPES}")
        if self.interval is not None and (len(self.interval) != 2 or self.interval[0] >= self.interval[1]):
            raise ValueError(f"cfg interval={self.interval}: expected (lo, hi) with lo < hi")
        if self.noise_level is not None and self.noise_level < 0:
            raise ValueError(f"noise_level={self.noise_level}: expected a non-negative number")
        return self


@dataclass
class TextOptions:
    """x2t decoding: greedy when temperature == 0, else temperature + nucleus (top-p) sampling."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    ignore_eos: bool = False  # keep decoding past <|im_end|> to max_new_tokens (fixed-length benchmarks)
    cuda_graph: bool = True  # greedy decoding on CUDA replays one captured graph per token
    # greedy decoding's step through torch.compile (fused elementwise kernels) before any capture;
    # compiling costs time on first use of each batch shape, so it pays off for long or many decodes
    compile: bool = False

    def validate(self) -> TextOptions:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected a positive integer")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: expected >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: expected a number in (0, 1]")
        return self


@dataclass
class Request:
    """One thing to generate. `source`: frames [T, 3, H, W] in [0, 1] (the i2v first frame, the edit
    source, the x2t input). Target size: `height`/`width`/`frames` for t2i/t2v/i2v (i2v defaults to
    the image's size), the source's size for edits."""

    task: str
    prompt: str
    height: int | None = None
    width: int | None = None
    frames: int = 1
    seed: int = 0
    source: torch.Tensor | None = None


@dataclass
class LatentResult:
    latents: torch.Tensor  # [P, C, T, h, w] float32
    timesteps: torch.Tensor  # [steps + 1]
    log_probs: torch.Tensor | None = None  # [P, steps] (0 at ODE steps; None when no step had noise)
    trajectory: list[torch.Tensor] | None = None  # x before each step and the final x, each [P, N, C]
    noise_steps: list[int] = field(default_factory=list)  # the steps that got SDE noise


@dataclass
class GeneratedText:
    text: str
    token_ids: list[int]
    finished: bool  # stopped at <|im_end|> (False: hit the token limit)


@dataclass
class Output:
    request: Request
    frames: torch.Tensor | None = None  # uint8 [F, H, W, 3] for visual tasks
    text: GeneratedText | None = None


def validate_request(req: Request, config: LanceConfig) -> None:
    """Cheap checks before any model work; messages name the offending value."""
    task = canonical_task(req.task)
    vae = config.vae
    s, ts = vae.spatial_stride, vae.temporal_stride
    if task in ("i2v",) + EDIT_TASKS + TEXT_TASKS:
        if req.source is None:
            raise ValueError(f"task {task} needs an input {'video' if task in ('video_edit', 'v2t') else 'image'}")
        if req.source.dim() != 4 or req.source.shape[1] != 3:
            raise ValueError(f"{task}: input frames must be [T, 3, H, W]; got {tuple(req.source.shape)}")
    if task in TEXT_TASKS:
        if config.vit is None:
            raise ValueError(f"task {task} needs a ViT, but the model config has vit=None")
        return
    if task in EDIT_TASKS:
        frames, height, width = req.source.shape[0], req.source.shape[2], req.source.shape[3]
    else:
        frames = req.frames if task != "t2i" else 1
        height = req.height if req.height is not None else (req.source.shape[2] if req.source is not None else None)
        width = req.width if req.width is not None else (req.source.shape[3] if req.source is not None else None)
        if height is None or width is None:
            raise ValueError(f"task {task} needs --height and --width")
    if task in ("t2i", "image_edit") and frames != 1:
        raise ValueError(f"{task}: frames={frames}: an image has 1 frame")
    if height <= 0 or width <= 0 or height % s or width % s:
        raise ValueError(f"size {height}x{width} (HxW) is not divisible by the VAE stride {s}")
    if frames < 1 or (frames - 1) % ts:
        raise ValueError(f"frames={frames}: the VAE needs 1 + {ts}k frames (k >= 0)")
    lat_t, lat_h, lat_w = 1 + (frames - 1) // ts, height // s, width // s
    if lat_h > config.max_latent_size or lat_w > config.max_latent_size:
        raise ValueError(f"size {height}x{width} gives a {lat_h}x{lat_w} latent; the model's position table "
                         f"holds at most {config.max_latent_size} (= {config.max_latent_size * s} px)")
    if lat_t > config.max_latent_frames:
        raise ValueError(f"frames={frames} gives {lat_t} latent frames; the model holds at most "
                         f"{config.max_latent_frames}")
    if task == "i2v" and (req.source.shape[2], req.source.shape[3]) != (height, width):
        raise ValueError(f"i2v: the image is {req.source.shape[2]}x{req.source.shape[3]} but the target is "
                         f"{height}x{width}; resize the image first")


# ================================================================================= KV cache
def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention of q [R, Hq, Lq, D] over k/v [R, Hkv, Lk, D] -> [R, Hq, Lq, D], every row in
    one call. GQA without repeating the KV heads: the `Hq / Hkv` query heads that share a KV head
    are folded into the query length (query head h uses KV head h // (Hq / Hkv)). `mask`: bool
    [R, 1, 1, Lk], True where a key is valid."""
    rows, hq, lq, d = q.shape
    hkv = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(rows, hkv, (hq // hkv) * lq, d), k, v, attn_mask=mask)
    return out.reshape(rows, hq, lq, v.shape[-1])


@torch.library.custom_op("lance::kv_cache_write", mutates_args=("cache_k", "cache_v"))
def kv_cache_write(cache_k: torch.Tensor, cache_v: torch.Tensor, layer: int, rows: torch.Tensor,
                   slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write one token per row into the decoding cache in place: `cache_*[layer, rows[i], :, slots[i]]
    = k/v[i]` (caches [layers, R, Hkv, capacity, D]; k/v [R, Hkv, D])."""
    cache_k[layer, rows, :, slots] = k
    cache_v[layer, rows, :, slots] = v


@kv_cache_write.register_fake
def _(cache_k, cache_v, layer, rows, slots, k, v) -> None:
    return None


def _rank_in_row(sample: torch.Tensor, rows: int) -> torch.Tensor:
    """For tokens of a packed batch (sample id of each), the index of each token within its row."""
    rows_of = sample.long()
    return (F.one_hot(rows_of, rows).cumsum(0) - 1).gather(1, rows_of[:, None]).squeeze(1)


class KVCache:
    """The decoding cache: per layer, the post-rotary keys/values of every row in one preallocated
    buffer [layers, rows, Hkv, capacity, D], written in place (no concatenation, no repeated heads).

    Row r holds its prefix in slots [0, lengths[r]); each decode step writes the row's new token at
    slot lengths[r] and then advances the lengths (`attend_decode`, `advance`). Attention masks out
    the unused slots, so rows of any length share one call."""

    def __init__(self, num_layers: int, lengths: list[int], capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        rows = len(lengths)
        if max(lengths) > capacity:
            raise ValueError(f"KV cache capacity {capacity} is smaller than the longest prefix ({max(lengths)})")
        self.k = torch.zeros(num_layers, rows, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=device)
        self.capacity = capacity
        self._slots = torch.arange(capacity, device=device)
        self._rows = torch.arange(rows, device=device)
        self._prefill_rows: torch.Tensor | None = None
        self._prefill_slots: torch.Tensor | None = None
        self._decode_mask = self._mask_upto(self.lengths)

    def _mask_upto(self, last: torch.Tensor) -> torch.Tensor:
        """Slots [0, last[r]] valid -> bool [R, 1, 1, capacity]."""
        return (self._slots[None] <= last[:, None])[:, None, None]

    def set_prefill_layout(self, sample: torch.Tensor) -> None:
        """Where each token of a packed prefill goes: row = its sample, slot = its rank in the row."""
        self._prefill_rows = sample.long()
        self._prefill_slots = _rank_in_row(sample, len(self.lengths))

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys/values [L, Hkv, D] of a packed prefill (after `set_prefill_layout`)."""
        self.k[layer][self._prefill_rows, :, self._prefill_slots] = k.to(self.k.dtype)
        self.v[layer][self._prefill_rows, :, self._prefill_slots] = v.to(self.v.dtype)

    def attend_decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One new token per row (q [R, Hq, D], k/v [R, Hkv, D]), written at slot lengths[r]."""
        # The write is an opaque op that mutates the cache (`kv_cache_write`), so a compiled decode
        # step (TextOptions.compile) traces the whole layer, attention included, as one graph.
        # Traced as plain indexing, the in-place writes became copies of the whole cache layer (a
        # batch-32 step went from 7.8 to 20.7 ms on an H200).
        kv_cache_write(self.k, self.v, layer, self._rows, self.lengths, k.to(self.k.dtype), v.to(self.v.dtype))
        o = grouped_attention(q[:, :, None].to(self.k.dtype), self.k[layer], self.v[layer], self._decode_mask)
        return o[:, :, 0].to(q.dtype)

    def restore_lengths(self, lengths: torch.Tensor) -> None:
        """Set every row's length (e.g. undo warm-up steps), masks included, in place."""
        self.lengths.copy_(lengths)
        self._decode_mask.copy_(self._mask_upto(self.lengths))

    def advance(self) -> None:
        """After a decode step: every row holds one more token (in place, so a captured CUDA graph
        that calls it keeps working)."""
        self.lengths += 1
        self._decode_mask.copy_(self._mask_upto(self.lengths))


class TargetKVCache:
    """The denoising cache: row r's prefix keys/values followed by room for its T target tokens,
    rows back to back ([layers, sum(len_r + T), Hkv, D]). Every step writes the target keys in
    place; the first R' rows' keys are then one contiguous range, so all rows attend in ONE varlen
    call (FlashAttention on CUDA in bf16/fp16, GQA native; a per-row reference elsewhere)."""

    def __init__(self, num_layers: int, lengths: list[int], target: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.lengths, self.target = list(lengths), target
        self.offsets = [0]
        for n in self.lengths:
            self.offsets.append(self.offsets[-1] + n + target)
        self.k = torch.zeros(num_layers, self.offsets[-1], kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.target_slots = torch.tensor([[o + n + j for j in range(target)] for o, n in zip(self.offsets, self.lengths)],
                                         dtype=torch.long, device=device).view(len(self.lengths), target)
        self._prefill_slots: torch.Tensor | None = None
        self._cu: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._varlen = None
        if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
            from .attention import FlashVarlenAttention

            self._varlen = FlashVarlenAttention().varlen_fn

    def set_prefill_layout(self, sample: torch.Tensor) -> None:
        offsets = torch.tensor(self.offsets[:-1], dtype=torch.long, device=sample.device)
        self._prefill_slots = offsets[sample.long()] + _rank_in_row(sample, len(self.lengths))

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][self._prefill_slots] = k.to(self.k.dtype)
        self.v[layer][self._prefill_slots] = v.to(self.v.dtype)

    def _cu_seqlens(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        if rows not in self._cu:
            device = self.k.device
            cu_q = torch.arange(rows + 1, dtype=torch.int32) * self.target
            cu_k = torch.tensor(self.offsets[: rows + 1], dtype=torch.int32)
            self._cu[rows] = (cu_q.to(device), cu_k.to(device), max(self.lengths[:rows]) + self.target)
        return self._cu[rows]

    def attend_target(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      index: torch.Tensor) -> torch.Tensor:
        """q/k/v [L, H, D] of packed target splits; `index` [R', T]: storage indexes of row r's T
        target tokens (rows 0..R'-1). Each row attends its prefix and its own target."""
        rows, length = index.shape
        slots = self.target_slots[:rows].reshape(-1)
        flat = index.reshape(-1)
        self.k[layer][slots] = k[flat].to(self.k.dtype)
        self.v[layer][slots] = v[flat].to(self.v.dtype)
        keys, values = self.k[layer][: self.offsets[rows]], self.v[layer][: self.offsets[rows]]
        queries = q[flat].to(self.k.dtype)
        if self._varlen is not None:
            cu_q, cu_k, max_k = self._cu_seqlens(rows)
            o = self._varlen(queries, keys, values, cu_q, cu_k, length, max_k, causal=False)
        else:
            o = torch.cat([
                grouped_attention(queries[r * length:(r + 1) * length].transpose(0, 1)[None],
                                  keys[a:b].transpose(0, 1)[None], values[a:b].transpose(0, 1)[None],
                                  torch.ones(1, 1, 1, b - a, dtype=torch.bool, device=q.device))[0].transpose(0, 1)
                for r, (a, b) in enumerate(zip(self.offsets[:rows], self.offsets[1:rows + 1]))])
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        out[flat] = o.to(out.dtype)
        return out


def _row_index(batch: PackedBatch, rows: int) -> list[torch.Tensor]:
    sample = batch.layout.sample
    return [torch.nonzero(sample == r).flatten() for r in range(rows)]


def _last_token_index(batch: PackedBatch, row_index: list[torch.Tensor]) -> torch.Tensor:
    """Storage index of each row's last rendered token."""
    order = batch.layout.order
    return torch.stack([idx[order[idx].argmax()] for idx in row_index])


def prefill(model: Lance, batch: PackedBatch, target: int | None = None, capacity: int | None = None
            ) -> tuple[KVCache | TargetKVCache, torch.Tensor, torch.Tensor]:
    """Run packed prefixes once (their own Lance mask), caching every layer's k/v per row: in a
    `TargetKVCache` with room for `target` tokens per row (denoising), or a `KVCache` of `capacity`
    slots per row (decoding). Returns (cache, final und hidden states, final gen hidden states)."""
    device = batch.positions.device
    text = model.config.text
    dtype = model.language_model.model.embed_tokens.weight.dtype
    backend = model.attention_backend(device, dtype)
    state = backend.prepare(batch.layout)
    shape = (text.num_hidden_layers, list(batch.sample_lens))
    if target is not None:
        cache = TargetKVCache(*shape, target, text.num_key_value_heads, text.head_dim, dtype, device)
    else:
        cache = KVCache(*shape, capacity, text.num_key_value_heads, text.head_dim, dtype, device)
    cache.set_prefill_layout(batch.layout.sample)

    def attend(i, q, k, v):
        cache.store(i, k, v)
        return backend.attend(q, k, v, state)

    token_t = torch.zeros(batch.vae_latents.shape[0], device=device)
    x_und, x_gen = model.embed(batch, batch.vae_latents, token_t)
    h_und, h_gen = model.run_decoder(batch.positions, x_und, x_gen, attend)
    return cache, h_und, h_gen


# ================================================================================= denoising
def _noise_split_index(rendered: RenderedSample) -> int:
    for i, s in enumerate(rendered.splits):
        if s.mode == "noise":
            return i
    raise ValueError(f"{rendered.task}: the rendered sample has no noisy target split")


def split_at_target(rendered: RenderedSample) -> tuple[RenderedSample, RenderedSample]:
    """(prefix, target): the splits before the noisy target, and the target split alone, each with
    its slice of the full render's positions. What follows the target is never needed."""
    i = _noise_split_index(rendered)
    start = sum(len(s) for s in rendered.splits[:i])
    end = start + len(rendered.splits[i])
    return (RenderedSample(rendered.task, rendered.splits[:i], rendered.positions[:, :start]),
            RenderedSample(rendered.task, [rendered.splits[i]], rendered.positions[:, start:end]))


@dataclass
class _Plan:
    """A packed batch the velocity is computed on, for a fixed set of rows."""

    batch: PackedBatch
    rows: int
    target: torch.Tensor  # long [R * N]: gen-stream indexes of the target latents (where x goes), row-major
    noisy: torch.Tensor  # float [Ng]: 1 where a token gets the step's timestep
    row_index: torch.Tensor | None = None  # cached path: long [R, T] storage indexes of each row's target


class DenoisingSession:
    """The CFG rows of a batch of prompts with the same task and target size, ready to give guided
    velocities: `velocity(x [P, N, C], t)`. With `use_cache`, prefixes are encoded once here into
    a static KV cache, and each step runs only the target splits of all rows in one attention call
    per layer. Nothing in a step waits on the host: indexes are precomputed per row count."""

    def __init__(self, model: Lance, builder: SequenceBuilder, samples: list[Sample], options: SamplerOptions,
                 use_cache: bool = True) -> None:
        self.model, self.options, self.use_cache = model, options.validate(), use_cache
        self.device = next(model.parameters()).device
        tasks = {s.task for s in samples}
        shapes = {tuple(s.target.latent_shape) for s in samples}
        if len(tasks) != 1 or len(shapes) != 1:
            raise ValueError(f"one denoising batch needs one task and one target size; got tasks {sorted(tasks)} "
                             f"and latent shapes {sorted(shapes)}")
        self.samples = list(samples)
        self.num_prompts = len(samples)
        self.latent_shape = shapes.pop()
        self.channels = model.config.vae.latent_channels
        image_guidance = options.image_scale != 1.0 and all(s.source is not None for s in samples) \
            and samples[0].task in EDIT_TASKS
        self.branches = ["cond"]
        if options.text_scale != 1.0 or image_guidance:
            self.branches.append("text_uncond")
        if image_guidance:
            self.branches.append("uncond_all")
        self.rendered = [builder.render(s, drop_caption=b != "cond", drop_condition=b == "uncond_all")
                         for b in self.branches for s in samples]
        self._plans: dict[int, _Plan] = {}
        self.cache: TargetKVCache | None = None
        if use_cache:
            split = [split_at_target(r) for r in self.rendered]
            self._targets = [t for _, t in split]
            target_len = self._targets[0].positions.shape[1]
            batch = pack_rendered([p for p, _ in split], model.config).to(self.device)
            self.cache, _, _ = prefill(model, batch, target=target_len)

    def _plan(self, rows: int) -> _Plan:
        if rows not in self._plans:
            if self.use_cache:
                batch = pack_rendered(self._targets[:rows], self.model.config).to(self.device)
                index = torch.stack(_row_index(batch, rows))
            else:
                batch = pack_rendered(self.rendered[:rows], self.model.config).to(self.device)
                index = None
            # Target latents in row order (item r = row r), so x [R, N, C] maps onto them directly.
            target = torch.nonzero(batch.vae_item >= 0).flatten()
            target = target[torch.argsort(batch.vae_item[target], stable=True)]
            self._plans[rows] = _Plan(batch, rows, target, batch.vae_noisy.float(), index)
        return self._plans[rows]

    def raw_velocity(self, x_rows: torch.Tensor, t: float) -> torch.Tensor:
        """Unguided velocities of rows [R, N, C] (R = P or P * branches) at time t -> [R, N, C] fp32."""
        model, plan = self.model, self._plan(x_rows.shape[0])
        batch = plan.batch
        latents = batch.vae_latents.float().index_copy(0, plan.target, x_rows.reshape(-1, x_rows.shape[-1]).float())
        token_t = plan.noisy * t
        x_und, x_gen = model.embed(batch, latents, token_t)
        if self.use_cache:
            def attend(i, q, k, v):
                return self.cache.attend_target(i, q, k, v, plan.row_index)

            _, h_gen = model.run_decoder(batch.positions, x_und, x_gen, attend)
        else:
            _, h_gen = model.backbone(batch, x_und, x_gen)
        return model.llm2vae(h_gen[plan.target]).float().view(x_rows.shape)

    def velocity(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Guided velocity [P, N, C] at time t (only the conditional rows run outside the interval)."""
        o = self.options
        active = len(self.branches) > 1 and cfg_active(t, o.interval)
        n = len(self.branches) if active else 1
        v = self.raw_velocity(x.repeat(n, 1, 1), t).view(n, *x.shape)
        if not active:
            return v[0]
        return cfg_velocity(v[0], v[1], v[2] if n > 2 else None, text_scale=o.text_scale,
                            image_scale=o.image_scale, renorm=o.renorm, renorm_min=o.renorm_min)


def _clean_frames(sample: Sample) -> tuple[int, torch.Tensor | None]:
    """(clean latent frames, their latent tokens [n, C]) of an i2v target."""
    n = sample.target.clean_frames
    if not n:
        return 0, None
    if sample.source is None or sample.source.latent is None:
        raise ValueError("an i2v target with clean frames needs source.latent (the image's VAE latent)")
    lat = sample.source.latent[:, :n]
    return n, lat.flatten(1).transpose(0, 1).float()


def resolve_noise_steps(noise_steps: str | list[int] | None, options: SamplerOptions) -> list[int]:
    """The steps that get SDE noise: "all" (the SDE sampler), None (the ODE sampler), or a list."""
    if noise_steps is None:
        return []
    steps = list(range(options.num_steps)) if noise_steps == "all" else sorted({int(j) for j in noise_steps})
    if steps and options.noise_level is None:
        raise ValueError("SDE steps need options.noise_level (None is the ODE sampler)")
    if steps and not 0 <= steps[0] <= steps[-1] < options.num_steps:
        raise ValueError(f"noise_steps={noise_steps}: expected step indexes in [0, {options.num_steps})")
    return steps


@torch.no_grad()
def run_sampler(session: DenoisingSession, seeds: list[int], noise_steps: str | list[int] | None = "auto",
                progress: bool = False, return_trajectory: bool = False) -> LatentResult:
    """THE sampler loop (generation, validation and RL all run it): denoise from seeded noise with
    the session's guided velocity; SDE steps at `noise_steps` (log-probs returned for them, 0 at
    ODE steps), the ODE elsewhere. "auto" = every step when `options.noise_level` is set, else none.

    All noise is drawn up front from one generator per sample on the session's device (a seed gives
    the same latents on the same device, whatever the batch); the loop itself never waits on the
    host. The flow update and the log-probs run in float32. No autograd graph is kept (a trainable
    model sampled outside `torch.no_grad` would otherwise hold every step's activations); the RL
    update recomputes the log-probs it differentiates."""
    options = session.options
    if noise_steps == "auto":
        noise_steps = "all" if options.noise_level is not None else None
    sde = resolve_noise_steps(noise_steps, options)
    if len(seeds) != session.num_prompts:
        raise ValueError(f"{session.num_prompts} samples but {len(seeds)} seeds")
    device, c = session.device, session.channels
    lt, lh, lw = session.latent_shape
    n = lt * lh * lw
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    draws = torch.stack([torch.randn(1 + len(sde), n, c, generator=g, device=device) for g in gens])
    x = draws[:, 0].contiguous()
    # i2v: the clean first frame(s) stay fixed; only the other tokens are updated.
    keep = 0
    for i, s in enumerate(session.samples):
        k, clean = _clean_frames(s)
        if k:
            x[i, : clean.shape[0]] = clean.to(device)
            keep = clean.shape[0]
    update = torch.arange(keep, n, device=device)
    timesteps = flow_timesteps(options.num_steps, options.shift)
    noise_of = {j: m + 1 for m, j in enumerate(sde)}
    log_probs = torch.zeros(len(seeds), options.num_steps, device=device)
    trajectory = [x.clone()] if return_trajectory else None
    steps = tqdm(range(options.num_steps), desc=f"{session.samples[0].task} x{len(seeds)}", unit="step",
                 disable=not progress, leave=False)
    for j in steps:
        t, t_next = float(timesteps[j]), float(timesteps[j + 1])
        v = session.velocity(x, t)
        if keep:
            x_j, v_j = x.index_select(1, update), v.index_select(1, update)
        else:
            x_j, v_j = x, v
        if j in noise_of:
            noise = draws[:, noise_of[j]]
            x_new, logp, _, _ = sde_step(x_j, v_j, t, t_next, options.noise_level,
                                         noise=noise.index_select(1, update) if keep else noise)
            log_probs[:, j] = logp
        else:
            x_new = euler_step(x_j, v_j, t, t_next)
        x = x.index_copy(1, update, x_new) if keep else x_new
        if return_trajectory:
            trajectory.append(x.clone())
    latents = x.view(len(seeds), lt, lh, lw, c).permute(0, 4, 1, 2, 3).contiguous()
    return LatentResult(latents, timesteps, log_probs if sde else None, trajectory, sde)


@torch.no_grad()
def sample_latents(model: Lance, builder: SequenceBuilder, samples: list[Sample], seeds: list[int],
                   options: SamplerOptions, use_cache: bool = True, progress: bool = False,
                   return_trajectory: bool = False, noise_steps: str | list[int] | None = "auto") -> LatentResult:
    """Denoise a batch of same-task, same-size samples from seeded noise -> latents [P, C, T, h, w]."""
    if len(seeds) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(seeds)} seeds")
    session = DenoisingSession(model, builder, samples, options, use_cache)
    return run_sampler(session, seeds, noise_steps, progress, return_trajectory)


# ================================================================================= text
def _pick_tokens(logits: torch.Tensor, vocab: int, options: TextOptions,
                 generators: list[torch.Generator]) -> list[int]:
    logits = logits.float().clone()
    logits[:, vocab:] = float("-inf")
    if options.temperature == 0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits / options.temperature, dim=-1).cpu()
    if options.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= options.top_p  # keep the smallest prefix reaching top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, generators)]


def _greedy_step(model: Lance, cache: KVCache, ids: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor,
                 step_index: torch.Tensor, x_gen: torch.Tensor, vocab: int) -> None:
    """One greedy token for every row, in place: the decoder over the cache, argmax into `ids` and
    into column `step_index` of `tokens`, positions and column advanced."""
    lm = model.language_model
    h_und, _ = model.run_decoder(pos.expand(3, -1), lm.model.embed_tokens(ids), x_gen, cache.attend_decode)
    cache.advance()
    nxt = lm.lm_head(h_und)[:, :vocab].argmax(-1)
    ids.copy_(nxt)
    tokens.index_copy_(1, step_index, nxt[:, None])
    pos += 1
    step_index += 1


@functools.cache
def _compiled_greedy_step():
    """`_greedy_step` through torch.compile, made once per process (its graphs are then reused by
    every decoder of the same model and shapes)."""
    return torch.compile(_greedy_step, dynamic=False)


class GreedyDecoder:
    """Greedy decoding that stays on the device: one step embeds every row's last token, runs the
    decoder over the static cache, advances it and writes the argmax into a token buffer, with no
    host round trip. On CUDA the step is captured once as a CUDA graph and replayed (the launch
    cost of ~30 kernels per layer is what bounds batch-1 decoding otherwise); elsewhere it runs
    eagerly. The host looks at the tokens every `check_every` steps to stop early."""

    def __init__(self, model: Lance, cache: KVCache, first: torch.Tensor, next_pos: torch.Tensor, vocab: int,
                 max_new_tokens: int, graph: bool, compile: bool = False) -> None:
        self.model, self.cache, self.vocab = model, cache, vocab
        rows = first.shape[0]
        # Two spare columns (and two spare cache slots, see `generate_text`): the graph's warm-up steps.
        self.tokens = torch.zeros(rows, max_new_tokens + 2, dtype=torch.long, device=first.device)
        self.tokens[:, 0] = first
        self.ids = first.clone()
        self.pos = next_pos.clone()  # position of the token in `ids`
        self.step_index = torch.ones(1, dtype=torch.long, device=first.device)  # column the next token goes to
        self._x_gen = model.vae2llm.weight.new_zeros(0, model.config.text.hidden_size)
        self._graph = None
        self._compile = compile
        if graph and max_new_tokens > 1:
            self._capture()

    def _run_step(self) -> None:
        step = _compiled_greedy_step() if self._compile else _greedy_step
        step(self.model, self.cache, self.ids, self.pos, self.tokens, self.step_index, self._x_gen, self.vocab)

    def _capture(self) -> None:
        """Warm up on a side stream (the steps' effects are undone), then record one step."""
        saved = [t.clone() for t in (self.cache.lengths, self.ids, self.pos, self.step_index, self.tokens)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run_step()
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip((self.cache.lengths, self.ids, self.pos, self.step_index, self.tokens), saved):
            t.copy_(s)
        self.cache.restore_lengths(self.cache.lengths)
        self._graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread's unsafe calls break the capture. In the default (global)
        # mode a CUDA call from any thread does, e.g. the pin-memory thread of a DataLoader that keeps
        # prefetching while a stage validates: "operation failed due to a previous error during
        # capture", seen on an H200 with a prefetching loader beside an evaluation's decode.
        with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
            self._run_step()

    def run(self, steps: int, stop: int | None, check_every: int = 16) -> torch.Tensor:
        """Up to `steps` more tokens (each row's first is already in place); returns tokens [R, 1 + made]."""
        done = 0
        while done < steps:
            for _ in range(min(check_every, steps - done)):
                self._graph.replay() if self._graph is not None else self._run_step()
                done += 1
            if stop is not None and bool((self.tokens[:, : 1 + done] == stop).any(1).all()):
                break
        return self.tokens[:, : 1 + done]


def _with_answer(rendered: RenderedSample, ids: list[int]) -> RenderedSample:
    if not ids:
        return rendered
    splits = rendered.splits + [Split("causal", "text", -1, list(ids))]
    return RenderedSample(rendered.task, splits, mape_positions(splits))


@torch.no_grad()
def generate_text(model: Lance, builder: SequenceBuilder, samples: list[Sample], options: TextOptions,
                  seeds: list[int] | None = None, use_cache: bool = True) -> list[GeneratedText]:
    """Answer x2t prompts (rendered through `assistant\\n`); one seeded generator per prompt. A
    sample that carries an answer (a curated row with its reference) is prompted without it.

    Cached decoding keeps every row in the batch until the last one stops (fixed shapes: one
    attention call per layer for all rows over the static cache); tokens after a row's
    `<|im_end|>` are computed but discarded."""
    options.validate()
    # a sample's own answer (a curated row's reference) is what is to be generated, not prompt text
    samples = [s if s.answer is None and s.answer_ids is None else replace(s, answer=None, answer_ids=None)
               for s in samples]
    tok: Tokenizer = builder.tok
    vocab, stop = len(tok), tok.special_id(IM_END)
    device = next(model.parameters()).device
    seeds = seeds if seeds is not None else list(range(len(samples)))
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    rendered = [builder.render(s) for s in samples]
    rows = len(rendered)
    lm_head = model.language_model.lm_head
    embed = model.language_model.model.embed_tokens
    answers: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows

    def full_logits(active: list[int]) -> torch.Tensor:
        batch = pack_rendered([_with_answer(rendered[r], answers[r]) for r in active], model.config).to(device)
        token_t = torch.zeros(batch.vae_latents.shape[0], device=device)
        x_und, x_gen = model.embed(batch, batch.vae_latents, token_t)
        h_und, _ = model.backbone(batch, x_und, x_gen)
        return lm_head(h_und[_last_token_index(batch, _row_index(batch, len(active)))])

    cache = None
    if use_cache:
        batch = pack_rendered(rendered, model.config).to(device)
        capacity = max(batch.sample_lens) + options.max_new_tokens + 2
        if options.compile:  # cache shapes in steps of 256 slots: calls of nearby lengths share a compiled step
            capacity = -(-capacity // 256) * 256
        cache, h_und, _ = prefill(model, batch, capacity=capacity)
        logits = lm_head(h_und[_last_token_index(batch, _row_index(batch, rows))])
        next_pos = torch.tensor([int(r.positions[0, -1]) + 1 for r in rendered], device=device)
        x_gen = logits.new_zeros(0, embed.embedding_dim)
        if options.temperature == 0:
            decoder = GreedyDecoder(model, cache, logits[:, :vocab].argmax(-1), next_pos, vocab,
                                    options.max_new_tokens, graph=options.cuda_graph and device.type == "cuda",
                                    compile=options.compile)
            made = decoder.run(options.max_new_tokens - 1, None if options.ignore_eos else stop).tolist()
            out = []
            for ids in made:
                end = ids.index(stop) if stop in ids and not options.ignore_eos else len(ids)
                out.append(GeneratedText(tok.decode(ids[:end]), ids[:end], end < len(ids)))
            return out
    else:
        logits = full_logits(list(range(rows)))
    active = list(range(rows))
    for step in range(options.max_new_tokens):
        picked = _pick_tokens(logits, vocab, options, [gens[r] for r in active])
        for r, token in zip(active, picked):
            if finished[r]:
                continue  # a stopped row still decodes (static shapes); its tokens are discarded
            if token == stop and not options.ignore_eos:
                finished[r] = True
            else:
                answers[r].append(token)
        if all(finished) or step == options.max_new_tokens - 1:
            break
        if not use_cache:
            active = [r for r in range(rows) if not finished[r]]
            logits = full_logits(active)
            continue
        ids = torch.tensor(picked, device=device)
        h_und, _ = model.run_decoder((next_pos + step).expand(3, -1), embed(ids), x_gen, cache.attend_decode)
        cache.advance()
        logits = lm_head(h_und)
    return [GeneratedText(tok.decode(a), a, f) for a, f in zip(answers, finished)]


# ================================================================================= the generator
def _round_to(x: float, m: int) -> int:
    return max(m, round(x / m) * m)


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if frames.shape[-2:] == (height, width):
        return frames
    return F.interpolate(frames, size=(height, width), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


class LanceGenerator:
    """A model + its VAE and tokenizer, ready to turn `Request`s into frames or text."""

    def __init__(self, model: Lance, vae=None, tokenizer: Tokenizer | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.config.tokenizer)
        merge = self.config.vit.spatial_merge_size if self.config.vit is not None else 2
        self.builder = SequenceBuilder(self.tokenizer, merge)
        self._vae = vae

    @classmethod
    def from_pretrained(cls, directory, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> LanceGenerator:
        return cls(Lance.from_pretrained(directory, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vae(self):
        if self._vae is None:
            from .encoders.vae import build_vae

            self._vae = build_vae(self.config.vae).to(self.device)
        return self._vae

    # ------------------------------------------------------------------ conditions
    def vae_latent(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames [T, 3, H, W] in [0, 1] -> normalised latent [C, T', h, w] (float32)."""
        video = (frames.to(self.device).float() * 2 - 1).permute(1, 0, 2, 3)[None]
        return self.vae.encode(video)[0].float()

    def vit_visual(self, frames: torch.Tensor, scale: float = 1.0) -> Visual:
        """ViT tokens of frames resized to multiples of patch*merge (scaled by `scale`)."""
        from .encoders.vit import encode_vit, vit_patches

        cfg = self.config.vit
        if cfg is None:
            raise ValueError("this model has no ViT (config.vit is None)")
        h, w = _round_to(frames.shape[2] * scale, cfg.stride), _round_to(frames.shape[3] * scale, cfg.stride)
        patches, grid = vit_patches(_resize(frames.float(), h, w), cfg)
        with torch.no_grad():
            tokens = encode_vit(self.model.vit_model, patches, grid)
        return Visual(vit_tokens=tokens, vit_grid=tuple(grid.tolist()))

    def prepare(self, req: Request) -> Sample:
        """A validated request -> the `Sample` the sequence builder renders (sources encoded)."""
        validate_request(req, self.config)
        task = canonical_task(req.task)
        s, ts = self.config.vae.spatial_stride, self.config.vae.temporal_stride
        if task in TEXT_TASKS:
            return Sample(task, req.prompt, source=self.vit_visual(req.source))
        if task in EDIT_TASKS:
            src = self.vit_visual(req.source, EDIT_VIT_SCALE) if self.config.vit is not None else Visual()
            src.latent = self.vae_latent(req.source)
            src.latent_shape = tuple(src.latent.shape[1:])
            return Sample(task, req.prompt, source=src, target=Visual(latent_shape=src.latent_shape))
        height = req.height if req.height is not None else req.source.shape[2]
        width = req.width if req.width is not None else req.source.shape[3]
        frames = 1 if task == "t2i" else req.frames
        shape = (1 + (frames - 1) // ts, height // s, width // s)
        if task == "i2v":
            return Sample(task, req.prompt, source=Visual(latent=self.vae_latent(req.source[:1])),
                          target=Visual(latent_shape=shape, clean_frames=1))
        return Sample(task, req.prompt, target=Visual(latent_shape=shape))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [P, C, T, h, w] -> uint8 frames [P, F, H, W, 3]."""
        pixels = self.vae.decode(latents.to(self.device))
        return ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, requests: list[Request], sampler: SamplerOptions | None = None,
                 text: TextOptions | None = None, batch_size: int = 4, use_cache: bool = True,
                 progress: bool = False) -> list[Output]:
        """Every request, batched by (task, target size); outputs in request order."""
        sampler = (sampler or SamplerOptions()).validate()
        text = (text or TextOptions()).validate()
        for req in requests:
            validate_request(req, self.config)
        samples = [self.prepare(r) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, (req, s) in enumerate(zip(requests, samples)):
            key = (s.task, tuple(s.target.latent_shape) if s.target is not None else None)
            groups.setdefault(key, []).append(i)
        outputs: list[Output | None] = [None] * len(requests)
        for (task, _), members in groups.items():
            for a in range(0, len(members), batch_size):
                chunk = members[a:a + batch_size]
                seeds = [requests[i].seed for i in chunk]
                if task in TEXT_TASKS:
                    answers = generate_text(self.model, self.builder, [samples[i] for i in chunk], text, seeds,
                                            use_cache)
                    for i, ans in zip(chunk, answers):
                        outputs[i] = Output(requests[i], text=ans)
                    continue
                result = sample_latents(self.model, self.builder, [samples[i] for i in chunk], seeds, sampler,
                                        use_cache, progress)
                for i, frames in zip(chunk, self.decode(result.latents)):
                    outputs[i] = Output(requests[i], frames=frames)
        return outputs
