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
from dataclasses import dataclass, field

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
    log_probs: torch.Tensor | None = None  # [P, steps] (SDE only)
    trajectory: list[torch.Tensor] | None = None  # x before each step and the final x, each [P, N, C]


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
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention of q [Lq, Hq, D] over k/v [Lk, Hkv, D] (GQA) -> [Lq, Hq, D]."""
    if q.is_cuda and k.shape[1] != q.shape[1]:
        # Repeating the KV heads keeps every fused SDPA kernel eligible (not all take `enable_gqa`).
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


class KVCache:
    """Post-rotary keys/values of encoded prefixes: per layer, one [L_row, Hkv, D] tensor per row.

    A query of row r attends the row's cached keys plus the new keys of row r passed in (the target
    split of a denoising step, or the token being decoded); no mask is needed for either."""

    def __init__(self, num_layers: int, num_rows: int) -> None:
        self.keys: list[list[torch.Tensor | None]] = [[None] * num_rows for _ in range(num_layers)]
        self.values: list[list[torch.Tensor | None]] = [[None] * num_rows for _ in range(num_layers)]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, row_index: list[torch.Tensor]) -> None:
        for r, idx in enumerate(row_index):
            self.keys[layer][r], self.values[layer][r] = k[idx], v[idx]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               row_index: list[torch.Tensor], rows: list[int], append: bool = False) -> torch.Tensor:
        """q/k/v of the new tokens; `row_index[j]` = their storage indexes belonging to cache row
        `rows[j]`. `append`: keep the new keys/values (token-by-token decoding)."""
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        for idx, r in zip(row_index, rows):
            kk = torch.cat([self.keys[layer][r], k[idx]])
            vv = torch.cat([self.values[layer][r], v[idx]])
            if append:
                self.keys[layer][r], self.values[layer][r] = kk, vv
            out.index_copy_(0, idx, _attention(q[idx], kk, vv).to(out.dtype))
        return out


def _row_index(batch: PackedBatch, rows: int) -> list[torch.Tensor]:
    sample = batch.layout.sample
    return [torch.nonzero(sample == r).flatten() for r in range(rows)]


def _last_token_index(batch: PackedBatch, row_index: list[torch.Tensor]) -> torch.Tensor:
    """Storage index of each row's last rendered token."""
    order = batch.layout.order
    return torch.stack([idx[order[idx].argmax()] for idx in row_index])


def prefill(model: Lance, batch: PackedBatch, rows: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """Run packed prefixes once (their own Lance mask), caching every layer's k/v per row.
    Returns (cache, final und hidden states, final gen hidden states)."""
    device = batch.positions.device
    backend = model.attention_backend(device)
    state = backend.prepare(batch.layout)
    row_index = _row_index(batch, rows)
    cache = KVCache(model.config.text.num_hidden_layers, rows)

    def attend(i, q, k, v):
        cache.store(i, k, v, row_index)
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
    target: torch.Tensor  # bool [Ng]: gen tokens of the targets (where x goes)
    row_index: list[torch.Tensor] = field(default_factory=list)  # cached path: storage indexes per row


class DenoisingSession:
    """The CFG rows of a batch of prompts with the same task and target size, ready to give guided
    velocities: `velocity(x [P, N, C], t)`. With `use_cache`, prefixes are encoded once here."""

    def __init__(self, model: Lance, builder: SequenceBuilder, samples: list[Sample], options: SamplerOptions,
                 use_cache: bool = True) -> None:
        self.model, self.options, self.use_cache = model, options.validate(), use_cache
        self.device = next(model.parameters()).device
        tasks = {s.task for s in samples}
        shapes = {tuple(s.target.latent_shape) for s in samples}
        if len(tasks) != 1 or len(shapes) != 1:
            raise ValueError(f"one denoising batch needs one task and one target size; got tasks {sorted(tasks)} "
                             f"and latent shapes {sorted(shapes)}")
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
        self.cache: KVCache | None = None
        if use_cache:
            prefixes = [split_at_target(r)[0] for r in self.rendered]
            batch = pack_rendered(prefixes, model.config).to(self.device)
            self.cache, _, _ = prefill(model, batch, len(prefixes))

    def _plan(self, rows: int) -> _Plan:
        if rows not in self._plans:
            if self.use_cache:
                targets = [split_at_target(r)[1] for r in self.rendered[:rows]]
                batch = pack_rendered(targets, self.model.config).to(self.device)
                self._plans[rows] = _Plan(batch, rows, batch.vae_item >= 0, _row_index(batch, rows))
            else:
                batch = pack_rendered(self.rendered[:rows], self.model.config).to(self.device)
                self._plans[rows] = _Plan(batch, rows, batch.vae_item >= 0)
        return self._plans[rows]

    def raw_velocity(self, x_rows: torch.Tensor, t: float) -> torch.Tensor:
        """Unguided velocities of rows [R, N, C] (R = P or P * branches) at time t -> [R, N, C] fp32."""
        model, plan = self.model, self._plan(x_rows.shape[0])
        batch = plan.batch
        latents = batch.vae_latents.float().clone()
        latents[plan.target] = x_rows.reshape(-1, x_rows.shape[-1]).float()
        token_t = torch.where(batch.vae_noisy, torch.tensor(float(t), device=self.device),
                              torch.zeros((), device=self.device))
        x_und, x_gen = model.embed(batch, latents, token_t)
        if self.use_cache:
            rows = list(range(plan.rows))

            def attend(i, q, k, v):
                return self.cache.attend(i, q, k, v, plan.row_index, rows)

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


def sample_latents(model: Lance, builder: SequenceBuilder, samples: list[Sample], seeds: list[int],
                   options: SamplerOptions, use_cache: bool = True, progress: bool = False,
                   return_trajectory: bool = False) -> LatentResult:
    """Denoise a batch of same-task, same-size samples from seeded noise -> latents [P, C, T, h, w]."""
    if len(seeds) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(seeds)} seeds")
    session = DenoisingSession(model, builder, samples, options, use_cache)
    device, c = session.device, session.channels
    lt, lh, lw = session.latent_shape
    n = lt * lh * lw
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(n, c, generator=g) for g in gens]).to(device)
    update = torch.ones(n, dtype=torch.bool, device=device)
    for i, s in enumerate(samples):
        k, clean = _clean_frames(s)
        if k:
            x[i, : clean.shape[0]] = clean.to(device)
            update[: clean.shape[0]] = False
    timesteps = flow_timesteps(options.num_steps, options.shift)
    log_probs, trajectory = [], [x.clone()] if return_trajectory else None
    steps = tqdm(range(options.num_steps), desc=f"{samples[0].task} x{len(samples)}", unit="step",
                 disable=not progress, leave=False)
    for j in steps:
        t, t_next = float(timesteps[j]), float(timesteps[j + 1])
        v = session.velocity(x, t)
        if options.noise_level is None:
            x = torch.where(update[None, :, None], euler_step(x, v, t, t_next), x)
        else:
            noise = torch.stack([torch.randn(int(update.sum()), c, generator=g) for g in gens]).to(device)
            x_upd, logp, _, _ = sde_step(x[:, update], v[:, update], t, t_next, options.noise_level, noise=noise)
            x = x.clone()
            x[:, update] = x_upd
            log_probs.append(logp)
        if return_trajectory:
            trajectory.append(x.clone())
    latents = x.view(len(samples), lt, lh, lw, c).permute(0, 4, 1, 2, 3).contiguous()
    return LatentResult(latents, timesteps, torch.stack(log_probs, 1) if log_probs else None, trajectory)


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


def _decode_attend(cache: KVCache, index: list[torch.Tensor], rows: list[int], layer: int, q, k, v):
    return cache.attend(layer, q, k, v, index, rows, append=True)


def _with_answer(rendered: RenderedSample, ids: list[int]) -> RenderedSample:
    if not ids:
        return rendered
    splits = rendered.splits + [Split("causal", "text", -1, list(ids))]
    return RenderedSample(rendered.task, splits, mape_positions(splits))


def generate_text(model: Lance, builder: SequenceBuilder, samples: list[Sample], options: TextOptions,
                  seeds: list[int] | None = None, use_cache: bool = True) -> list[GeneratedText]:
    """Answer x2t prompts (rendered through `assistant\\n`); one seeded generator per prompt."""
    options.validate()
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
    next_pos = [int(r.positions[0, -1]) + 1 for r in rendered]

    def full_logits(active: list[int]) -> torch.Tensor:
        batch = pack_rendered([_with_answer(rendered[r], answers[r]) for r in active], model.config).to(device)
        token_t = torch.zeros(batch.vae_latents.shape[0], device=device)
        x_und, x_gen = model.embed(batch, batch.vae_latents, token_t)
        h_und, _ = model.backbone(batch, x_und, x_gen)
        return lm_head(h_und[_last_token_index(batch, _row_index(batch, len(active)))])

    cache = None
    if use_cache:
        batch = pack_rendered(rendered, model.config).to(device)
        cache, h_und, _ = prefill(model, batch, rows)
        logits = lm_head(h_und[_last_token_index(batch, _row_index(batch, rows))])
    else:
        logits = full_logits(list(range(rows)))
    active = list(range(rows))
    for step in range(options.max_new_tokens):
        picked = _pick_tokens(logits, vocab, options, [gens[r] for r in active])
        still = []
        for r, token in zip(active, picked):
            if token == stop:
                finished[r] = True
            else:
                answers[r].append(token)
                still.append(r)
        active = still
        if not active or step == options.max_new_tokens - 1:
            break
        if not use_cache:
            logits = full_logits(active)
            continue
        ids = torch.tensor([answers[r][-1] for r in active], device=device)
        pos = torch.tensor([next_pos[r] + len(answers[r]) - 1 for r in active], device=device).expand(3, -1)
        x_und = embed(ids)
        x_gen = x_und.new_zeros(0, x_und.shape[1])
        index = [torch.tensor([j], device=device) for j in range(len(active))]
        attend = functools.partial(_decode_attend, cache, index, list(active))
        h_und, _ = model.run_decoder(pos, x_und, x_gen, attend)
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
