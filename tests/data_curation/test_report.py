"""Curation report plots: an empty distribution (no videos in the corpus) draws no bar at 0."""
from __future__ import annotations

from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from data_curation.report import _histogram, write_plots


def test_histogram_of_nothing_says_so_instead_of_a_bar_at_zero():
    fig, (empty, full) = plt.subplots(1, 2)
    _histogram(empty, [], "video duration", "seconds")
    _histogram(full, [1.0, 2.0, 2.5], "video duration", "seconds")
    assert len(empty.patches) == 0 and [t.get_text() for t in empty.texts] == ["no items"]
    assert sum(p.get_height() for p in full.patches) == 3
    plt.close(fig)


def test_plots_of_an_image_only_corpus(tmp_path):
    inspected = [{"height": 64, "width": 96, "caption_chars": 20, "num_frames": 1} for _ in range(3)]
    paths = write_plots(tmp_path, inspected, Counter({"1:1": 3}))
    assert sorted(p.name for p in paths) == ["buckets.png", "caption_length.png", "duration.png", "resolution.png"]
    assert all(p.stat().st_size > 0 for p in paths)
