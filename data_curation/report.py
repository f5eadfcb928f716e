"""The stats report of a curation run: counts per stage and reason, histograms, bucket distribution.

Written next to the shards (`reports/run-RRRRR/`) and logged to MLflow as artifacts: `stats.json`
plus PNG plots of the input resolution, video duration and caption length of every decodable new
item, and of the bucket distribution of the curated rows. Counts cover every listed item, so the
numbers add up: listed = already seen + new; new = quarantined + filtered + duplicates + curated.
With scene splitting, each video that was split counts as its clips from there on:
new - scenes.videos + scenes.clips = quarantined + filtered + duplicates + curated (`scene_counts`).
`animated` (only when there were any) counts the animated images decoded as videos, those kept as
their first frame, and the frames the latter dropped (`animation_counts`).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from data_curation.scenes import parent_uri
from lance_platform.files import write_json_atomic


def count_outcomes(inspected: list[dict]) -> dict[str, dict[str, int]]:
    """{status: {reason: count}} of the inspect rows (status ok is left out)."""
    out: dict[str, Counter] = {}
    for row in inspected:
        if row["status"] != "ok":
            out.setdefault(row["status"], Counter())[row["reason"]] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def scene_counts(inspected: list[dict]) -> dict[str, int]:
    """{videos split, scenes detected in them, long_scenes cut into several clips, clips (= rows)}."""
    split = [r for r in inspected if r.get("start_frame") is not None]
    scenes = {(parent_uri(r["source_uri"]), r.get("scene_index")) for r in split}
    long = {(parent_uri(r["source_uri"]), r.get("scene_index")) for r in split if (r.get("scene_parts") or 1) > 1}
    return {"videos": len({parent_uri(r["source_uri"]) for r in split}), "scenes": len(scenes),
            "long_scenes": len(long), "clips": len(split)}


def animation_counts(inspected: list[dict]) -> dict[str, int] | None:
    """{as_video, first_frame, dropped_frames} of the animated images among the decoded rows; None
    when there were none."""
    kinds = Counter(r.get("animated") for r in inspected if r.get("animated"))
    if not kinds:
        return None
    return {"as_video": kinds["video"], "first_frame": kinds["first_frame"],
            "dropped_frames": sum(int(r.get("dropped_frames") or 0) for r in inspected if r.get("animated"))}


def flat_metrics(counts: dict) -> dict[str, float]:
    """Nested counts -> {"quarantined.truncated_image": 1.0, ...} for MLflow."""
    out: dict[str, float] = {}
    for key, value in counts.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": float(v) for k, v in flat_metrics(value).items()})
        else:
            out[key] = float(value)
    return out


def _histogram(ax, values: list[float], title: str, xlabel: str) -> None:
    if values:
        ax.hist(values, bins=min(30, max(5, len(values))), color="#3b6ea5")
    else:  # e.g. durations of a corpus without videos: say so instead of drawing a bar at 0
        ax.text(0.5, 0.5, "no items", ha="center", va="center", transform=ax.transAxes, color="#666666")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("items")


def write_plots(directory: Path, inspected: list[dict], buckets: Counter) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decoded = [r for r in inspected if r.get("height")]
    videos = [r for r in decoded if r.get("num_frames", 1) > 1 or r.get("duration")]
    plots = {
        "resolution.png": ([np.sqrt(r["height"] * r["width"]) for r in decoded], "input resolution",
                           "sqrt(height x width) [px]"),
        "duration.png": ([r["duration"] for r in videos], "video duration", "seconds"),
        "caption_length.png": ([r["caption_chars"] for r in decoded], "caption length", "characters"),
    }
    paths = []
    for name, (values, title, xlabel) in plots.items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        _histogram(ax, values, title, xlabel)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=90)
        plt.close(fig)
        paths.append(directory / name)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = sorted(buckets)
    ax.bar(range(len(names)), [buckets[n] for n in names], color="#a5573b")
    ax.set_xticks(range(len(names)), names)
    ax.set_title("curated rows per aspect bucket")
    ax.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(directory / "buckets.png", dpi=90)
    plt.close(fig)
    return [*paths, directory / "buckets.png"]


def write_report(directory: Path, counts: dict, inspected: list[dict], buckets: Counter) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_plots(directory, inspected, buckets)
    write_json_atomic(directory / "stats.json", {"counts": counts, "buckets": dict(sorted(buckets.items()))},
                      sort_keys=True)
    return directory
