"""Checkpoint I/O in the official key layout (MODEL.md §2), and conversion from other layouts.

- `save_pretrained`: `model.safetensors` (official keys; the fixed `latent_pos_embed.pos_embed`
  table is left out, as the official loader drops it anyway; `lm_head` is always written, since
  the official layout is untied), `lance_config.json`, and an official-style `llm_config.json`
  (Qwen2.5-VL style: text fields, `rope_scaling.mrope_section`, the special-token ids and a full
  `vision_config`) so the directory also loads in the official inference code and, without our
  `lance_config.json`, back into this one with the same text and ViT shapes.
- `read_pretrained` (behind `Lance.from_pretrained`): our directories and the released `Lance_3B` / `Lance_3B_Video` ones
  (`model.safetensors` or `ema.safetensors`, `llm_config.json`; the ViT may sit in a separate
  `vit.safetensors` with bare keys). The model is built on the meta device and the tensors are
  assigned, so a 6B-parameter checkpoint needs no extra copy in memory.
- `read_qwen25vl` + `fill_from_qwen25vl` (behind `Lance.from_qwen25vl`): a fresh Lance from a Qwen2.5-VL checkpoint (HF layout, old or new key
  style): `visual.*` -> `vit_model.*`, the language model -> `language_model.*`, and every
  generation-expert weight copied from its understanding twin.

Only safetensors (and `torch.load(weights_only=True)` for `.pth`) are read: nothing is unpickled.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import (
    OFFICIAL_LLM_CONFIG_FILE,
    LanceConfig,
    text_config_from_qwen2,
    vit_config_from_qwen25vl,
    vit_config_to_qwen25vl,
)

log = logging.getLogger(__name__)

POS_EMBED_KEY = "latent_pos_embed.pos_embed"
GEN_SUFFIX = "_moe_gen"
LM_HEAD_KEY = "language_model.lm_head.weight"
EMBED_KEY = "language_model.model.embed_tokens.weight"
VIT_PREFIX = "vit_model."
# Qwen2.5-VL special-token ids (what the official code reads from llm_config.json).
QWEN25VL_TOKEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
                      "vision_start_token_id": 151652, "vision_end_token_id": 151653,
                      "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656}


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the model; the message names the keys/shapes/paths involved."""


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    source: str = ""

    def log(self) -> None:
        if self.missing:
            log.warning("%s: %d missing key(s): %s", self.source, len(self.missing), _preview(self.missing))
        if self.unexpected:
            log.warning("%s: %d unknown key(s) ignored: %s", self.source, len(self.unexpected), _preview(self.unexpected))


def _preview(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------- reading
def read_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` or `.pth`/`.pt`/`.bin` file (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        out = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                out[k] = f.get_tensor(k)
        return out
    obj = torch.load(str(path), map_location=device, weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def read_directory_tensors(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every `*.safetensors` shard of a directory (HF sharded layout)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(read_tensors(f, device))
    return out


# ---------------------------------------------------------------------------------------- loading
def check_and_report(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Shape mismatches are errors (naming key and both shapes); missing/unknown keys are reported."""
    expected = {k: v for k, v in model.state_dict().items() if k != POS_EMBED_KEY}
    for k, v in state.items():
        if k in expected and tuple(expected[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: shape mismatch for {k}: checkpoint {tuple(v.shape)}, "
                                  f"model {tuple(expected[k].shape)}")
    report = LoadReport(missing=sorted(set(expected) - set(state)),
                        unexpected=sorted(set(state) - set(expected) - {POS_EMBED_KEY}), source=source)
    return report


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True,
                 dtype: torch.dtype | None = None) -> LoadReport:
    """Load `state` into `model` (which may live on the meta device). Missing keys are an error
    when `strict`; unknown keys are reported and ignored."""
    state = {k: v for k, v in state.items() if k != POS_EMBED_KEY}
    tied = model.config.text.tie_word_embeddings
    if tied:
        # The head *is* the embedding: a stored head (the official layout always has one) is redundant.
        state.pop(LM_HEAD_KEY, None)
    report = check_and_report(model, state, source)
    if tied:
        report.missing = [k for k in report.missing if k != LM_HEAD_KEY]
    if strict and report.missing:
        raise CheckpointError(f"{source}: {len(report.missing)} missing key(s): {_preview(report.missing)}")
    report.log()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    known = {k: v for k, v in state.items() if k not in report.unexpected}
    model.load_state_dict(known, strict=False, assign=True)
    if tied:  # assign=True replaced the embedding Parameter: re-tie the head to it
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    model.apply_freeze()
    return report


def materialize(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Give real storage to what a checkpoint does not carry: the latent position table and
    non-persistent buffers (e.g. the ViT rotary frequencies)."""
    device = torch.device(device)
    pe = model.latent_pos_embed
    if pe.pos_embed.is_meta:
        pe.pos_embed = torch.nn.Parameter(torch.empty(pe.pos_embed.shape, device=device), requires_grad=False)
    pe.reset_table()
    if dtype is not None:
        pe.pos_embed.data = pe.pos_embed.data.to(dtype)
    for name, module in model.named_modules():
        for bname, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if hasattr(module, "compute_axial_rope_parameters"):  # transformers' vision rotary embedding
                inv_freq, _ = module.compute_axial_rope_parameters(module.config)
                module._buffers[bname] = inv_freq.to(device)
            else:
                raise CheckpointError(f"buffer {name}.{bname} has no value after loading")
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"parameters without values after loading: {_preview(leftover)}")


def resolve_weights_file(directory: Path, weights: str) -> Path:
    """`auto`: model.safetensors, else ema.safetensors; `model`/`ema`: that file; else a file name."""
    names = {"auto": ["model.safetensors", "ema.safetensors"], "model": ["model.safetensors"],
             "ema": ["ema.safetensors"]}.get(weights, [weights])
    for n in names:
        if (directory / n).is_file():
            return directory / n
    raise FileNotFoundError(f"no weights file in {directory}: looked for {', '.join(names)}")


def read_pretrained(directory: str | Path, weights: str = "auto", device: str | torch.device = "cpu",
                    vit_weights: str | Path | None = None) -> tuple[LanceConfig, dict[str, torch.Tensor], Path]:
    """(config, official-layout tensors, weights file) of a Lance checkpoint directory; `Lance.from_pretrained`
    builds the model on the meta device and assigns them."""
    directory = Path(directory)
    config = LanceConfig.from_pretrained(directory)
    path = resolve_weights_file(directory, weights)
    state = read_tensors(path, device)
    if vit_weights is not None and not Path(vit_weights).is_file():
        raise FileNotFoundError(f"ViT weights file not found: {vit_weights}")
    if config.vit is not None and not any(k.startswith(VIT_PREFIX) for k in state):
        # The official release keeps the ViT in its own file with bare keys (`patch_embed.proj.weight`).
        vit_path = Path(vit_weights) if vit_weights else directory / "vit.safetensors"
        if vit_path.is_file():
            state.update({VIT_PREFIX + _strip_vit_prefix(k): v for k, v in read_tensors(vit_path, device).items()})
    return config, state, path


def _strip_vit_prefix(key: str) -> str:
    for prefix in (VIT_PREFIX, "model.visual.", "visual."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


# ---------------------------------------------------------------------------------------- saving
def official_llm_config(config: LanceConfig) -> dict:
    """The text config in the official `llm_config.json` (Qwen2 / Qwen2.5-VL style) layout."""
    t = config.text
    out = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim, "intermediate_size": t.intermediate_size, "vocab_size": t.vocab_size,
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta, "hidden_act": "silu",
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section),
                         **({"mrope_interleaved": True} if t.mrope_interleaved else {})},
        # The saved layout always carries its own lm_head (the official loader forces untied).
        "tie_word_embeddings": False, "qk_norm": t.qk_norm,
        "layer_module": "Qwen2MoTDecoderLayer",
    }
    out.update(_token_ids(config))
    if config.vit is not None:
        # Qwen2.5-VL style; the official code reads spatial_merge_size / tokens_per_second from it,
        # and `from_official_config` reads the tower's shape back from it.
        out["vision_config"] = vit_config_to_qwen25vl(config.vit)
    return out


def _token_ids(config: LanceConfig) -> dict[str, int]:
    """Special-token ids for llm_config.json: the byte tokenizer's for `tokenizer="byte"` models,
    the Qwen2.5-VL ones otherwise."""
    if config.tokenizer != "byte":
        return dict(QWEN25VL_TOKEN_IDS)
    from .tokenizer import ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, ByteTokenizer

    tok = ByteTokenizer()
    return {"bos_token_id": tok.special_id(ENDOFTEXT), "eos_token_id": tok.special_id(IM_END),
            "pad_token_id": tok.special_id(ENDOFTEXT), "vision_start_token_id": tok.special_id(VISION_START),
            "vision_end_token_id": tok.special_id(VISION_END), "image_token_id": tok.special_id(IMAGE_PAD),
            "video_token_id": tok.special_id(VIDEO_PAD)}


def save_pretrained(model: torch.nn.Module, directory: str | Path, filename: str = "model.safetensors",
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomic write of weights + configs. `state` overrides the weights (e.g. an EMA copy)."""
    return save_state(model.config, model.state_dict() if state is None else state, directory, filename)


def save_state(config: LanceConfig, state: dict[str, torch.Tensor], directory: str | Path,
               filename: str = "model.safetensors") -> Path:
    """Write a full (unsharded) state dict of a model with `config` in the official layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k != POS_EMBED_KEY}
    if config.text.tie_word_embeddings and EMBED_KEY in tensors:
        # The official layout always has its own lm_head; safetensors refuses shared storage.
        tensors[LM_HEAD_KEY] = tensors[EMBED_KEY].clone()
    path = directory / filename
    tmp = directory / (filename + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "layout": "lance-official"})
    tmp.replace(path)
    config.save(directory)
    llm = directory / OFFICIAL_LLM_CONFIG_FILE
    llm_tmp = directory / (OFFICIAL_LLM_CONFIG_FILE + ".tmp")
    llm_tmp.write_text(json.dumps(official_llm_config(config), indent=2))
    llm_tmp.replace(llm)
    return path


# ---------------------------------------------------------------------------------------- Qwen2.5-VL
def qwen25vl_key(key: str) -> str | None:
    """Map a Qwen2.5-VL HF key (old `model.layers`/`visual` or new `model.language_model`/`model.visual`
    style) to the Lance layout; None for keys Lance does not use."""
    for prefix in ("model.visual.", "visual."):
        if key.startswith(prefix):
            return "vit_model." + key[len(prefix):]
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model."):]
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("model."):
        return "language_model." + key
    return None


def gen_twin_source(key: str) -> str:
    """`...q_proj_moe_gen.weight` -> `...q_proj.weight`, `...mlp_moe_gen.x` -> `...mlp.x`."""
    return key.replace(GEN_SUFFIX, "")


def config_from_qwen25vl(directory: Path, base: LanceConfig | None = None) -> LanceConfig:
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"Qwen2.5-VL config not found: {cfg_file}")
    raw = json.loads(cfg_file.read_text())
    text = raw.get("text_config")
    config = copy.deepcopy(base) if base is not None else LanceConfig.from_preset("lance-3b")
    # transformers 4 keeps the text fields flat; transformers 5 nests them under `text_config`.
    config.text = text_config_from_qwen2({**raw, **text} if isinstance(text, dict) else raw)
    # Lance's lm_head is untied (official: tie_word_embeddings forced False); a tied source's head
    # is initialised from its embedding in `fill_from_qwen25vl`.
    config.text.tie_word_embeddings = False
    if isinstance(raw.get("vision_config"), dict):
        config.vit = vit_config_from_qwen25vl(raw["vision_config"])
        config.vit.out_hidden_size = config.text.hidden_size
    return config.validate()


def qwen25vl_config(directory: Path, config: LanceConfig | None = None) -> LanceConfig:
    """The Lance config of a Qwen2.5-VL checkpoint directory (its tokenizer when it ships one)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"Qwen2.5-VL checkpoint directory not found: {directory}")
    config = config_from_qwen25vl(directory, config)
    if (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file():
        config.tokenizer = str(directory)
    return config


def read_qwen25vl(directory: str | Path, config: LanceConfig | None = None, device: str | torch.device = "cpu"
                  ) -> tuple[LanceConfig, dict[str, torch.Tensor], list[str]]:
    """(Lance config, tensors mapped to Lance keys, source keys Lance does not use) of a Qwen2.5-VL
    checkpoint directory; `Lance.from_qwen25vl` builds the model and calls `fill_from_qwen25vl`."""
    directory = Path(directory)
    config = qwen25vl_config(directory, config)
    mapped: dict[str, torch.Tensor] = {}
    dropped = []
    for k, v in read_directory_tensors(directory, device).items():
        nk = qwen25vl_key(k)
        if nk is None:
            dropped.append(k)
        else:
            mapped[nk] = v
    return config, mapped, dropped


def fill_from_qwen25vl(model: torch.nn.Module, mapped: dict[str, torch.Tensor], dropped: list[str],
                       source: str) -> LoadReport:
    """Load Qwen2.5-VL tensors into a freshly initialised Lance: the und expert and ViT as they are,
    every gen-expert weight from its und twin; weights Qwen2.5-VL lacks (q/k norms, latent heads)
    keep their fresh init. The report is also kept as `model.qwen_init_report`."""
    expected = model.state_dict()
    if LM_HEAD_KEY not in mapped and EMBED_KEY in mapped:
        # A tied source (e.g. Qwen2.5-VL-3B) stores no head: untie it as a copy of the embedding.
        mapped[LM_HEAD_KEY] = mapped[EMBED_KEY].clone()
    for k in expected:
        if GEN_SUFFIX in k and k not in mapped and gen_twin_source(k) in mapped:
            mapped[k] = mapped[gen_twin_source(k)].clone()
    fresh = sorted(k for k in expected if k not in mapped and k != POS_EMBED_KEY)
    report = check_and_report(model, mapped, source)
    model.load_state_dict({k: v for k, v in mapped.items() if k in expected}, strict=False)
    model.apply_freeze()
    if fresh:
        log.info("initialised from Qwen2.5-VL; %d tensors keep a fresh init: %s", len(fresh), _preview(fresh))
    report.unexpected += dropped
    report.missing = fresh
    model.qwen_init_report = report
    return report


# ---------------------------------------------------------------------------------------- sliced reading
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: a safetensors file, its key there, its shape and dtype, and the byte
    offset of its data in the file."""

    file: str
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    offset: int = 0


class SlicedReader:
    """Reads tensors, or ranges of their first dimension, from safetensors files with plain reads of
    just those bytes (no memory map, so nothing else of the file enters this process's memory);
    files stay open until `close`. A rank fills its shard of a parameter without the whole tensor."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}

    def rows(self, ref: TensorRef, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the tensor (all of it when both are None; 0-dim tensors whole)."""
        n = ref.shape[0] if ref.shape else 1
        start = 0 if start is None or not ref.shape else start
        stop = n if stop is None or not ref.shape else stop
        if not 0 <= start <= stop <= n:
            raise CheckpointError(f"{ref.file}: rows {start}:{stop} of {ref.key} {ref.shape} do not exist")
        inner = tuple(ref.shape[1:])
        row_bytes = math.prod(inner) * torch.empty((), dtype=ref.dtype).element_size()
        if ref.file not in self._files:
            self._files[ref.file] = open(ref.file, "rb")  # noqa: SIM115 (closed by close())
        f = self._files[ref.file]
        buf = bytearray((stop - start) * row_bytes)
        f.seek(ref.offset + start * row_bytes)
        if f.readinto(buf) != len(buf):
            raise CheckpointError(f"{ref.file}: {ref.key} ends before its data (file truncated?)")
        shape = (stop - start, *inner) if ref.shape else ()
        if not buf:
            return torch.empty(shape, dtype=ref.dtype)
        return torch.frombuffer(buf, dtype=ref.dtype).reshape(shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> SlicedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def index_safetensors(path: str | Path) -> dict[str, TensorRef]:
    """Key -> `TensorRef` of every tensor of a safetensors file (only its header is read); a header
    whose entries do not fit the file is a `CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: sharded loading reads safetensors files only")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= size - 8:
            raise CheckpointError(f"{path}: not a safetensors file (no header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: safetensors header does not parse ({exc})") from exc
    refs = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad header entry for {key!r} ({exc})") from exc
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or 8 + n + end > size:
            raise CheckpointError(f"{path}: {key!r} {shape} {info['dtype']} does not fit its bytes {begin}:{end}")
        refs[key] = TensorRef(str(path), key, shape, dtype, 8 + n + begin)
    return refs


def index_pretrained(directory: str | Path, weights: str = "auto", vit_weights: str | Path | None = None
                     ) -> tuple[LanceConfig, dict[str, TensorRef], Path]:
    """Like `read_pretrained`, without reading any tensor: (config, official key -> `TensorRef`,
    weights file), the separate `vit.safetensors` of the released layout included."""
    directory = Path(directory)
    config = LanceConfig.from_pretrained(directory)
    path = resolve_weights_file(directory, weights)
    refs = index_safetensors(path)
    if vit_weights is not None and not Path(vit_weights).is_file():
        raise FileNotFoundError(f"ViT weights file not found: {vit_weights}")
    if config.vit is not None and not any(k.startswith(VIT_PREFIX) for k in refs):
        vit_path = Path(vit_weights) if vit_weights else directory / "vit.safetensors"
        if vit_path.is_file():
            refs.update({VIT_PREFIX + _strip_vit_prefix(k): r for k, r in index_safetensors(vit_path).items()})
    refs.pop(POS_EMBED_KEY, None)
    if config.text.tie_word_embeddings:
        refs.pop(LM_HEAD_KEY, None)
    return config, refs, path


def index_qwen25vl(directory: str | Path, config: LanceConfig | None = None
                   ) -> tuple[LanceConfig, dict[str, TensorRef], list[str]]:
    """Like `read_qwen25vl`, without reading any tensor: (Lance config, Lance key -> `TensorRef`,
    source keys Lance does not use). `qwen25vl_sources` adds the gen-expert twins and the head."""
    directory = Path(directory)
    config = qwen25vl_config(directory, config)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    refs: dict[str, TensorRef] = {}
    dropped = []
    for f in files:
        for k, r in index_safetensors(f).items():
            nk = qwen25vl_key(k)
            if nk is None:
                dropped.append(k)
            else:
                refs[nk] = r
    return config, refs, dropped


def qwen25vl_sources(expected: list[str], refs: dict[str, TensorRef]) -> tuple[dict[str, TensorRef], list[str]]:
    """(Lance key -> source tensor for every `expected` key Qwen2.5-VL provides, the keys that keep a
    fresh init): as `fill_from_qwen25vl`, every gen-expert weight reads its und twin and a tied
    source's missing head reads the embedding."""
    out = {k: r for k, r in refs.items() if k in expected}
    if LM_HEAD_KEY in expected and LM_HEAD_KEY not in refs and EMBED_KEY in refs:
        out[LM_HEAD_KEY] = refs[EMBED_KEY]
    for k in expected:
        if GEN_SUFFIX in k and k not in out and gen_twin_source(k) in refs:
            out[k] = refs[gen_twin_source(k)]
    fresh = sorted(k for k in expected if k not in out and k != POS_EMBED_KEY)
    return out, fresh


def reset_buffers(model: torch.nn.Module, device: torch.device | str) -> None:
    """Recompute the non-persistent buffers a checkpoint never carries (the ViT rotary frequencies),
    e.g. after `to_empty` left them uninitialised."""
    for name, module in model.named_modules():
        buffers = list(module.named_buffers(recurse=False))
        if not buffers:
            continue
        if not hasattr(module, "compute_axial_rope_parameters"):
            raise CheckpointError(f"buffer(s) of {name} have no known value: {[b for b, _ in buffers]}")
        inv_freq, _ = module.compute_axial_rope_parameters(module.config)
        for bname, _ in buffers:
            module._buffers[bname] = inv_freq.to(device)
