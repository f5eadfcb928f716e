"""Curation fixtures: curation configs (the local Ray shared by these tests: `ray_local` of
tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_curation.config import CurationConfig
from lance_platform.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "curation" / "synthetic.yaml"


@pytest.fixture(scope="session")
def folder_config():
    return make_folder_config


def make_folder_config(corpus: Path, out: Path, *overrides: str) -> CurationConfig:
    """synthetic.yaml's encoders and buckets over a folder corpus, writing to `out`, without MLflow."""
    source = f"sources=[{{kind: folder, name: folder, uri: '{corpus}', captions: captions.jsonl}}]"
    return load_config(CurationConfig, CONFIG, [source, f"output.dir={out}", "tracking.enabled=false",
                                                "num_cpus=2", *overrides])
