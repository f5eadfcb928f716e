"""Sequence builder: chat template, splits per task, MaPE positions, CE labels, CFG dropout."""
from __future__ import annotations

import pytest
import torch

from lance_model import LanceConfig
from lance_model.packing import pack_samples
from lance_model.sequence import (
    CAPTION,
    REFERENCE_VAE,
    SOURCE_VAE,
    TARGET,
    TASKS,
    TEMPLATE,
    VIT,
    Sample,
    Split,
    Visual,
    mape_positions,
    system_prompt,
)
from lance_model.tokenizer import ByteTokenizer

TINY = LanceConfig.from_preset("tiny")


def text(n: int) -> Split:
    return Split("causal", "text", TEMPLATE, list(range(n)))


def block(kind: str, mode: str, modality: int, grid) -> Split:
    return Split(mode, kind, modality, [0, 0], None, grid)


def test_positions_text_vit_text_hand_computed():
    pos = mape_positions([text(3), block("vit", "full", VIT, (1, 2, 2)), text(2)])
    # text 0..2; <|vision_start|> at 3; grid tokens at 4 + (t*2, h, w); <|vision_end|> at max+1 = 6;
    # the whole ViT group's temporal row shifted so its first token sits at t = 1000 (shift 997).
    t = [0, 1, 2, 1000, 1001, 1001, 1001, 1001, 1003, 7, 8]
    h = [0, 1, 2, 3, 4, 4, 5, 5, 6, 7, 8]
    w = [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
    assert pos.tolist() == [t, h, w]


def test_positions_t2v_target_hand_computed():
    pos = mape_positions([text(3), block("vae", "noise", TARGET, (2, 2, 3)), text(1)])
    t = [0, 1, 2, 3] + [4] * 6 + [6] * 6 + [7, 8]
    h = [0, 1, 2, 3] + [4, 4, 4, 5, 5, 5] * 2 + [7, 8]
    w = [0, 1, 2, 3] + [4, 5, 6, 4, 5, 6] * 2 + [7, 8]
    assert pos.tolist() == [t, h, w]


def test_positions_edit_target_shares_source_positions():
    splits = [text(2), block("vit", "full", VIT, (1, 1, 2)), block("vae", "full", SOURCE_VAE, (1, 2, 2)), text(3),
              block("vae", "noise", TARGET, (1, 2, 2)), text(1)]
    pos = mape_positions(splits)
    lens = [len(s) for s in splits]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    src = pos[:, starts[2]:starts[2] + lens[2]]
    tgt = pos[:, starts[4]:starts[4] + lens[4]]
    assert torch.equal(src, tgt)
    # source block: after ViT block ending at (unshifted) 2 + 1 + 2 + 1 = 6 -> start token 6, tokens 7/8
    assert src.tolist() == [[6, 7, 7, 7, 7, 9], [6, 7, 7, 8, 8, 9], [6, 7, 8, 7, 8, 9]]
    assert pos[0, starts[1]] == 1000
    # the trailing <|im_end|> follows the unshifted target block, whose <|vision_end|> sat at 16
    assert pos[:, -1].tolist() == [17, 17, 17]


def test_positions_reference_starts_at_2000():
    pos = mape_positions([text(2), block("vit", "full", VIT, (1, 1, 1)), block("vae", "full", REFERENCE_VAE, (1, 1, 2)),
                          text(1), block("vae", "noise", TARGET, (1, 1, 2)), text(1)])
    ref_start = 2 + 3
    assert pos[0, ref_start] == 2000
    assert pos[0, ref_start + 1:ref_start + 3].tolist() == [2001, 2001]
    assert pos[1:, ref_start].tolist() == [5, 5]  # h, w untouched


def test_system_prompts_are_the_released_strings():
    assert system_prompt("t2i") == ("Describe the image by detailing the color, quantity, text, shape, size, texture, "
                                    "spatial relationships of the objects and background:")
    assert system_prompt("t2v") == ("Describe the video by detailing the color, quantity, visible text, shape, size, "
                                    "texture, spatial relationships and motion/camera movements of the objects and "
                                    "background:")
    assert system_prompt("image_edit") == (
        "Describe the key features of the input image (color, shape, size, texture, objects, background), then "
        "explain how the user\u2019s text instruction should alter or modify the image. Generate a new image that "
        "meets the user\u2019s requirements while maintaining consistency with the original input where appropriate.")
    assert system_prompt("i2v").startswith("Describe the key features of the input image (color, shape, size, "
                                           "texture, objects, background, style)")
    assert "generate a new video" in system_prompt("i2v")
    assert system_prompt("v2t") == ("Generate a detailed and accurate description of the video, including all the "
                                    "key moments and visual details.")
    with pytest.raises(ValueError, match="task='x2y'"):
        system_prompt("x2y")


def test_t2i_renders_the_chat_template(builder, sample_factory):
    tok = ByteTokenizer()
    s = Sample("t2i", "a cat", target=Visual(latent_shape=(1, 2, 2)))
    r = builder.render(s)
    assert [(x.mode, x.modality) for x in r.splits] == [
        ("causal", TEMPLATE), ("causal", CAPTION), ("causal", TEMPLATE), ("noise", TARGET), ("causal", TEMPLATE)]
    rendered = "".join(tok.decode(x.text_ids) if x.kind == "text" else
                       tok.decode([x.text_ids[0]]) + "#" * (len(x) - 2) + tok.decode([x.text_ids[1]]) for x in r.splits)
    assert rendered == ("<|im_start|>system\n" + system_prompt("t2i") + "<|im_end|>\n<|im_start|>user\na cat<|im_end|>\n"
                        "<|im_start|>assistant\n<|vision_start|>####<|vision_end|><|im_end|>")


@pytest.mark.parametrize("task,expected", [
    ("t2i", [("causal", TEMPLATE), ("causal", CAPTION), ("causal", TEMPLATE), ("noise", TARGET), ("causal", TEMPLATE)]),
    ("i2v", [("causal", TEMPLATE), ("causal", CAPTION), ("causal", TEMPLATE), ("noise", TARGET), ("causal", TEMPLATE)]),
    ("image_edit", [("causal", TEMPLATE), ("full", VIT), ("full", SOURCE_VAE), ("causal", CAPTION), ("causal", TEMPLATE),
                    ("noise", TARGET), ("causal", TEMPLATE)]),
    ("subject", [("causal", TEMPLATE), ("full", VIT), ("full", REFERENCE_VAE), ("causal", CAPTION),
                 ("causal", TEMPLATE), ("noise", TARGET), ("causal", TEMPLATE)]),
    ("i2t", [("causal", TEMPLATE), ("full", VIT), ("causal", CAPTION), ("causal", TEMPLATE), ("causal", TEMPLATE)]),
])
def test_splits_per_task(builder, sample_factory, task, expected):
    r = builder.render(sample_factory(task, 64))
    assert [(x.mode, x.modality) for x in r.splits] == expected
    assert len(r) == sum(len(x) for x in r.splits) == r.positions.shape[1]


def test_every_task_renders_and_packs(builder, sample_factory):
    for task in TASKS:
        batch = pack_samples([sample_factory(task, 64)], builder, TINY)
        assert batch.num_tokens == batch.sample_lens[0]
        assert batch.num_tokens - batch.num_und == batch.vae_latents.shape[0]


def test_ce_labels_are_answer_and_im_end(builder, sample_factory):
    tok = ByteTokenizer()
    s = Sample("i2t", "what?", answer="OK", source=sample_factory("i2t", 64).source)
    batch = pack_samples([s], builder, TINY)
    assert tok.decode(batch.ce_labels.tolist()) == "OK<|im_end|>"
    # each label is predicted by the token right before it (in rendered order)
    order = batch.layout.order
    ids = torch.full((batch.num_tokens,), -1)
    ids[order[batch.text_index]] = batch.text_ids
    predicted_from = order[batch.ce_index]
    assert torch.equal(ids[predicted_from + 1], batch.ce_labels)
    assert tok.decode(ids[predicted_from[:1]].tolist()) == "\n"


def test_caption_and_condition_dropout(builder, sample_factory):
    s = sample_factory("image_edit", 64)
    full = builder.render(s)
    no_cap = builder.render(s, drop_caption=True)
    no_cond = builder.render(s, drop_condition=True)
    assert CAPTION not in [x.modality for x in no_cap.splits]
    assert [x.modality for x in no_cond.splits if x.kind != "text"] == [TARGET]
    assert len(no_cap) == len(full) - len(s.caption.encode())
    # positions are recomputed for the shorter sequence: still contiguous text indexes from 0
    assert no_cap.positions[:, 0].tolist() == [0, 0, 0]


def test_i2v_first_latent_frame_is_clean(builder, sample_factory):
    s = sample_factory("i2v", 64)
    batch = pack_samples([s], builder, TINY)
    t, h, w = s.target.latent_shape
    assert batch.vae_noisy.tolist() == [False] * (h * w) + [True] * ((t - 1) * h * w)


def test_bad_samples_are_named(builder):
    with pytest.raises(ValueError, match="task='paint'"):
        builder.render(Sample("paint", "x"))
    with pytest.raises(ValueError, match="image_edit sample needs a source"):
        builder.render(Sample("image_edit", "x", target=Visual(latent_shape=(1, 2, 2))))
    with pytest.raises(ValueError, match=r"latent grid \(1, 40, 2\) exceeds"):
        pack_samples([Sample("t2i", "x", target=Visual(latent_shape=(1, 40, 2)))], builder, TINY)
