"""M-RoPE frequency layouts: the released contiguous sections and the interleaved (Qwen3-VL) one."""
from __future__ import annotations

import torch

from lance_model import Lance, LanceConfig
from lance_model.checkpoint import official_llm_config
from lance_model.config import text_config_from_qwen2
from lance_model.rope import frequency_axes, rotary_cos_sin


def test_sections_are_contiguous_and_interleaving_keeps_each_axis_count():
    assert frequency_axes((2, 3, 3)) == [0, 0, 1, 1, 1, 2, 2, 2]
    assert frequency_axes((2, 3, 3), interleaved=True) == [0, 1, 2, 0, 1, 2, 1, 2]
    for section in ((16, 24, 24), (8, 12, 12), (1, 0, 3)):
        axes = frequency_axes(section, interleaved=True)
        assert [axes.count(i) for i in range(3)] == list(section)


def test_interleaving_gives_the_width_fast_frequencies_and_leaves_text_positions_alone():
    head_dim, theta, section = 64, 1e4, (8, 12, 12)
    # text tokens (t = h = w): every layout rotates them alike
    text = torch.arange(5).expand(3, 5)
    for a, b in zip(rotary_cos_sin(text, head_dim, theta, section),
                    rotary_cos_sin(text, head_dim, theta, section, interleaved=True)):
        torch.testing.assert_close(a, b)
    # two image tokens one column apart: the largest angle between them, per layout
    cols = torch.tensor([[1000, 1000], [7, 7], [3, 4]])
    gap = {}
    for interleaved in (False, True):
        cos, sin = rotary_cos_sin(cols, head_dim, theta, section, interleaved=interleaved)
        angle = torch.atan2(sin, cos)[:, : head_dim // 2]
        gap[interleaved] = float((angle[1] - angle[0]).abs().max())
    assert gap[False] < 0.01          # the released layout: the width rotates by its slowest frequencies only
    assert gap[True] > 0.5            # interleaved: the width's fastest frequency is the third overall


def test_the_layout_changes_image_token_outputs_and_survives_the_official_config():
    torch.manual_seed(0)
    cfg = LanceConfig.from_preset("tiny")
    inter = LanceConfig.from_preset("tiny", text={"mrope_interleaved": True})
    assert not cfg.text.mrope_interleaved and inter.text.mrope_interleaved
    llm = official_llm_config(inter)
    assert llm["rope_scaling"]["mrope_interleaved"] is True
    assert "mrope_interleaved" not in official_llm_config(cfg)["rope_scaling"]  # the released layout as it was
    assert text_config_from_qwen2(llm).mrope_interleaved
    model = Lance(cfg)
    model.init_weights(std=0.05)
    positions = torch.tensor([[0, 1, 1000, 1000], [0, 1, 3, 3], [0, 1, 3, 4]])
    x = torch.randn(4, cfg.text.hidden_size)
    empty = x.new_zeros(0, cfg.text.hidden_size)
    with torch.no_grad():
        full = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(0, 1),
            v.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(0, 1)).transpose(0, 1)
        a, _ = model.run_decoder(positions, x, empty, lambda i, q, k, v: full(q, k, v))
        model.config.text.mrope_interleaved = True
        b, _ = model.run_decoder(positions, x, empty, lambda i, q, k, v: full(q, k, v))
    assert not torch.allclose(a, b)
