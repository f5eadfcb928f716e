"""The Lance attention mask over packed multi-sample sequences, and the kernels that apply it.

Mask rule (MODEL.md §4), for query q and key k of a packed batch:
    same sample  AND  (k precedes-or-is q  OR  q and k share a `full`/`noise` split)
                 AND  (k is not in a `noise` split, unless it is q's own split)

The rule is evaluated from a few per-token vectors (`MaskLayout`), never from a materialised
matrix, so the same function serves the dense reference (SDPA with a boolean mask), the
FlexAttention `mask_mod` (block mask built once per batch and shared by every layer), and the
split-wise decomposition used by flash-attn varlen.

Token order: the model keeps tokens in an *expert-sorted* order (all understanding tokens, then all
generation tokens) so that every per-expert projection is a contiguous slice. Causality therefore
compares `order` (the token's index in the rendered sequence), not the storage index.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CAUSAL, FULL, NOISE = "causal", "full", "noise"
MODES = (CAUSAL, FULL, NOISE)


@dataclass
class MaskLayout:
    """Per-token vectors (length L, storage order) from which the mask rule is evaluated."""

    sample: torch.Tensor  # long: sample index of the token
    split: torch.Tensor  # long: global split index of the token
    order: torch.Tensor  # long: index of the token in the rendered (pre-sort) sequence
    bidirectional: torch.Tensor  # bool: token sits in a `full` or `noise` split
    noise: torch.Tensor  # bool: token sits in a `noise` split

    def map(self, fn) -> MaskLayout:
        """A copy with `fn` applied to each vector."""
        return MaskLayout(*(fn(t) for t in (self.sample, self.split, self.order, self.bidirectional, self.noise)))

    def to(self, device: torch.device | str) -> MaskLayout:
        return self.map(lambda t: t.to(device))

    def __len__(self) -> int:
        return int(self.sample.shape[0])

    @classmethod
    def from_splits(cls, sample_splits: list[list[tuple[str, int]]],
                    storage_perm: torch.Tensor | None = None) -> MaskLayout:
        """Build from `[[(mode, length), ...] per sample]` in rendered order; `storage_perm[i]` is
        the rendered index of the token stored at position i (identity when None)."""
        lengths, modes, samples = [], [], []
        for s, splits in enumerate(sample_splits):
            for mode, length in splits:
                if mode not in MODES:
                    raise ValueError(f"split mode {mode!r}: expected one of {MODES}")
                lengths.append(length)
                modes.append(MODES.index(mode))
                samples.append(s)
        lengths_t = torch.tensor(lengths, dtype=torch.long)
        mode_t = torch.repeat_interleave(torch.tensor(modes, dtype=torch.long), lengths_t)
        order = torch.arange(int(lengths_t.sum())) if storage_perm is None else storage_perm.long()
        return cls(sample=torch.repeat_interleave(torch.tensor(samples, dtype=torch.long), lengths_t)[order],
                   split=torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)[order],
                   order=order,
                   bidirectional=(mode_t != MODES.index(CAUSAL))[order],
                   noise=(mode_t == MODES.index(NOISE))[order])


def mask_rule(layout: MaskLayout, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The Lance rule for (broadcastable) query/key storage indexes; the single source of truth."""
    same_sample = layout.sample[q] == layout.sample[k]
    same_split = layout.split[q] == layout.split[k]
    earlier = layout.order[k] <= layout.order[q]
    in_block = same_split & layout.bidirectional[q]
    visible = ~layout.noise[k] | same_split
    return same_sample & (earlier | in_block) & visible


def visible_pairs(sample_splits: list[list[tuple[str, int]]]) -> int:
    """Number of (query, key) pairs the rule allows, from split lengths alone (for FLOP counts)."""
    total = 0
    for splits in sample_splits:
        start = hidden = 0  # tokens before this split; of those, tokens in noise splits
        for mode, n in splits:
            visible_before = start - hidden
            total += n * visible_before + (n * (n + 1) // 2 if mode == CAUSAL else n * n)
            hidden += n if mode == NOISE else 0
            start += n
    return total


def dense_mask(layout: MaskLayout) -> torch.Tensor:
    """Boolean [L, L] mask (True = may attend)."""
    idx = torch.arange(len(layout), device=layout.sample.device)
    return mask_rule(layout, idx[:, None], idx[None, :])


# ---------------------------------------------------------------------------------------- backends
class AttentionBackend:
    """`prepare(layout)` once per batch, then `attend(q, k, v, state)` in every layer.

    q: [L, Hq, D], k/v: [L, Hkv, D] (GQA: Hq a multiple of Hkv). Returns [L, Hq, D]."""

    name = "base"

    def prepare(self, layout: MaskLayout):
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class SampleBlocks:
    """The packed batch as one padded row per sample, for batched SDPA: `index[b, j]` is the storage
    index of sample b's j-th token (0 in padding), `slot[i]` the flat [B * Lmax] slot of storage
    token i, `mask` [B, 1, Lmax, Lmax] the Lance rule within each sample (a padding query sees
    slot 0 only, so no row is empty; its output is never read)."""

    index: torch.Tensor
    slot: torch.Tensor
    mask: torch.Tensor


def sample_blocks(layout: MaskLayout) -> SampleBlocks:
    sample = layout.sample
    n = len(layout)
    rows = int(sample.max()) + 1 if n else 0
    order = torch.argsort(sample, stable=True)  # storage indexes grouped by sample
    counts = torch.bincount(sample, minlength=rows)
    width = int(counts.max()) if n else 0
    starts = torch.cumsum(counts, 0) - counts
    row = sample[order]
    col = torch.arange(n, device=sample.device) - starts[row]
    index = torch.zeros(rows, width, dtype=torch.long, device=sample.device)
    valid = torch.zeros(rows, width, dtype=torch.bool, device=sample.device)
    index[row, col] = order
    valid[row, col] = True
    slot = torch.empty(n, dtype=torch.long, device=sample.device)
    slot[order] = row * width + col
    mask = mask_rule(layout, index[:, :, None], index[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    first = torch.arange(width, device=sample.device) == 0
    mask |= ~valid[:, :, None] & first[None, None, :]
    return SampleBlocks(index, slot, mask[:, None])


class SdpaAttention(AttentionBackend):
    """PyTorch SDPA with a boolean mask: the reference backend (CPU, tests, fp32 activations).

    Attention never crosses samples, so the packed batch runs as one padded row per sample
    (`sample_blocks`): the work and the mask are B * Lmax^2, not (B * Lmax)^2 as one dense mask over
    the whole pack would be (a GRPO micro-batch of 64 rows of 300 tokens: 5.8M mask entries instead
    of 369M per head)."""

    name = "sdpa"

    def prepare(self, layout: MaskLayout) -> SampleBlocks:
        return sample_blocks(layout)

    def attend(self, q, k, v, state: SampleBlocks):
        if q.is_cuda and k.shape[1] != q.shape[1]:
            # A masked SDPA call with `enable_gqa` can fall back to the math kernel, which
            # materialises the [H, L, L] scores (reported upstream, e.g. ComfyUI PR #15135).
            # Repeating the KV heads is the same math and keeps the memory-efficient kernel.
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        qb, kb, vb = (x[state.index].transpose(1, 2) for x in (q, k, v))  # [B, H, Lmax, D]
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=state.mask, enable_gqa=kb.shape[1] != qb.shape[1])
        return out.transpose(1, 2).reshape(-1, *out.shape[1:2], out.shape[-1])[state.slot]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class FlexAttention(AttentionBackend):
    """FlexAttention with a block mask built once per batch from the mask rule."""

    name = "flex"

    def __init__(self, block_size: int = 128, compile: bool | None = None,
                 kernel_options: dict | None = None) -> None:
        self.block_size = block_size
        self.compile = compile
        self.kernel_options = kernel_options  # flex_attention's Triton options (tuning), None = defaults

    def prepare(self, layout: MaskLayout):
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q_idx, kv_idx):
            return mask_rule(layout, q_idx, kv_idx)

        n = len(layout)
        device = layout.sample.device
        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device,
                                 BLOCK_SIZE=self.block_size)

    def attend(self, q, k, v, state):
        from torch.nn.attention.flex_attention import flex_attention

        use_compile = self.compile if self.compile is not None else q.is_cuda
        # Inside a compiled region (e.g. `compile_layers`) dynamo traces flex_attention itself.
        fn = _compiled_flex() if use_compile and not torch.compiler.is_compiling() else flex_attention
        out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                 block_mask=state, enable_gqa=True, kernel_options=self.kernel_options)
        return out[0].transpose(0, 1)


VarlenFn = Callable[..., torch.Tensor]


@dataclass
class VarlenPlan:
    """Split-wise decomposition of the mask into varlen attention problems (one per split).

    Every split's queries attend [visible prefix keys of its sample] + [its own split], causally
    (bottom-right aligned) for `causal` splits and fully for `full`/`noise` splits."""

    groups: list[tuple[bool, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]]


def plan_varlen(layout: MaskLayout) -> VarlenPlan:
    sample, split, order = layout.sample.cpu(), layout.split.cpu(), layout.order.cpu()
    bidir, noise = layout.bidirectional.cpu(), layout.noise.cpu()
    by_order = torch.argsort(order)  # storage indexes in rendered order
    groups: dict[bool, list] = {True: [[], [], [0], [0], 0, 0], False: [[], [], [0], [0], 0, 0]}
    # Walk the rendered sequence split by split, keeping each sample's visible prefix.
    split_r = split[by_order]
    boundaries = torch.nonzero(split_r[1:] != split_r[:-1]).flatten() + 1
    starts = [0] + boundaries.tolist()
    ends = boundaries.tolist() + [len(split_r)]
    prefix: list[torch.Tensor] = []
    current_sample = None
    for a, b in zip(starts, ends):
        toks = by_order[a:b]
        first = int(toks[0])
        if int(sample[first]) != current_sample:
            current_sample, prefix = int(sample[first]), []
        causal = not bool(bidir[first])
        keys = torch.cat(prefix + [toks]) if prefix else toks
        g = groups[causal]
        g[0].append(toks)
        g[1].append(keys)
        g[2].append(g[2][-1] + len(toks))
        g[3].append(g[3][-1] + len(keys))
        g[4] = max(g[4], len(toks))
        g[5] = max(g[5], len(keys))
        if not bool(noise[first]):
            prefix.append(toks)
    device = layout.sample.device
    out = []
    for causal, (qs, ks, cu_q, cu_k, mq, mk) in groups.items():
        if not qs:
            continue
        out.append((causal, torch.cat(qs).to(device), torch.cat(ks).to(device),
                    torch.tensor(cu_q, dtype=torch.int32, device=device),
                    torch.tensor(cu_k, dtype=torch.int32, device=device), mq, mk))
    return VarlenPlan(out)


class FlashVarlenAttention(AttentionBackend):
    """flash-attn varlen over the split-wise decomposition (`plan_varlen`).

    `varlen_fn` defaults to `flash_attn.flash_attn_varlen_func` when the flash-attn package is
    installed, else to `torch_flash_varlen` (PyTorch's bundled FlashAttention-2 kernels, CUDA only);
    tests pass a reference with the same signature (q, k, v, cu_q, cu_k, max_q, max_k, causal=...)
    to check the decomposition. On the H100 the split-wise problems cost only the visible pairs and
    ran a lance-3b train step ~6% faster than FlexAttention (benchmarks/BENCHMARKS.md)."""

    name = "flash"

    def __init__(self, varlen_fn: VarlenFn | None = None) -> None:
        if varlen_fn is None:
            try:
                from flash_attn import flash_attn_varlen_func as varlen_fn  # type: ignore[no-redef]
            except ImportError:
                varlen_fn = torch_flash_varlen
        self.varlen_fn = varlen_fn

    def prepare(self, layout: MaskLayout) -> VarlenPlan:
        return plan_varlen(layout)

    def attend(self, q, k, v, state: VarlenPlan):
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
        for causal, q_idx, k_idx, cu_q, cu_k, mq, mk in state.groups:
            res = self.varlen_fn(q[q_idx], k[k_idx], v[k_idx], cu_q, cu_k, mq, mk, causal=causal)
            out = out.index_copy(0, q_idx, res.to(out.dtype))
        return out


def torch_flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                       max_q: int, max_k: int, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """`flash_attn_varlen_func`-compatible call on PyTorch's bundled FlashAttention-2 kernels
    (CUDA, fp16/bf16, differentiable; GQA native; a causal mask is aligned bottom-right, as in
    flash-attn >= 2.1, which the split-wise plan relies on). `scale` defaults to 1/sqrt(head_dim)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                   scale=scale)[0]


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


HALF = (torch.bfloat16, torch.float16)


def make_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> AttentionBackend:
    """`auto`: flash varlen on CUDA for bf16/fp16 activations (the fastest measured,
    benchmarks/BENCHMARKS.md), dense SDPA on CPU and for fp32 activations (FlashAttention has no
    fp32 kernels). `flash` needs a CUDA GPU: it runs the flash-attn package when installed, else
    PyTorch's bundled FlashAttention-2 kernels. `dtype` None: the activations are taken to be half."""
    device = torch.device(device)
    if name == "auto":
        name = "flash" if device.type == "cuda" and (dtype is None or dtype in HALF) else "sdpa"
    if name == "sdpa":
        return SdpaAttention()
    if name == "flex":
        return FlexAttention()
    if name == "flash":
        if device.type != "cuda":
            raise RuntimeError("attention_backend='flash' needs a CUDA GPU (it runs flash-attn when installed: "
                               "pip install 'lance-pipelines[gpu]'; else PyTorch's bundled flash kernels)")
        if dtype is not None and dtype not in HALF:
            raise RuntimeError(f"attention_backend='flash' runs bf16/fp16 only, the activations are {dtype}: "
                               "load the model in bf16 (e.g. dtype=torch.bfloat16) or use attention_backend=auto")
        return FlashVarlenAttention()
    raise ValueError(f"attention_backend={name!r}: expected one of auto, sdpa, flex, flash")
