"""Shared fixtures: the local Ray of a group of test modules, tiny random models and synthetic
samples (everything offline, CPU)."""
from __future__ import annotations

import atexit
import importlib.abc
import importlib.util
import os
import random
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lance_model import Lance, LanceConfig
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import ByteTokenizer

TESTS = Path(__file__).resolve().parent
# Test directories whose modules share one local Ray (started by the first test that needs it),
# instead of a start (~6 s) and a shutdown per module. pipelines and rl run one after the other
# and start no Ray of their own (no `ray start`, no CLI subprocess), so they form one group.
RAY_GROUPS = {"data_curation": "data_curation", "pipelines": "train", "rl": "train"}


# ------------------------------------------------------------------------------ MLflow stores
# Every test that tracks writes to a new `sqlite:///<workdir>/mlflow.db`, and MLflow builds each
# new store by running its whole Alembic migration chain: 3-4.5 s of CPU a store, dozens of stores
# a run. In this test process a new, empty sqlite store instead receives a copy (sqlite's backup
# API) of one store that MLflow migrated the ordinary way once per session: the same tables, the
# same schema version. A store that already has tables, a non-sqlite one, and every store made in
# another process (CLI subprocesses, Ray workers) are initialised by MLflow itself as before.
_MLFLOW_DB_UTILS = "mlflow.store.db.utils"
_schema_template: list[Path] = []


def _template_store(initialize) -> Path:
    if not _schema_template:
        import sqlalchemy

        folder = Path(tempfile.mkdtemp(prefix="mlflow-schema-"))
        atexit.register(shutil.rmtree, folder, True)
        path = folder / "template.db"
        engine = sqlalchemy.create_engine(f"sqlite:///{path}")
        try:
            initialize(engine)
        finally:
            engine.dispose()
        _schema_template.append(path)
    return _schema_template[0]


def _copy_schema_into_new_sqlite_stores(db_utils) -> None:
    original = getattr(db_utils, "_initialize_tables", None)
    if original is None:  # another MLflow layout: leave it alone
        return

    def initialize_tables(engine) -> None:
        import sqlalchemy

        database = engine.url.database
        if (engine.dialect.name != "sqlite" or not database or database == ":memory:"
                or sqlalchemy.inspect(engine).get_table_names()):
            return original(engine)
        source = sqlite3.connect(_template_store(original))
        target = engine.raw_connection()
        try:
            source.backup(target.driver_connection)
        finally:
            target.close()
            source.close()

    db_utils._initialize_tables = initialize_tables


class _PatchMlflowStoreInit(importlib.abc.MetaPathFinder):
    """Installs the template copy when MLflow's db utils are first imported (MLflow itself takes
    ~3 s to import, which a session that never tracks should not pay here)."""

    def find_spec(self, name, path, target=None):
        if name != _MLFLOW_DB_UTILS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module) -> None:
            exec_module(module)
            _copy_schema_into_new_sqlite_stores(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _MLFLOW_DB_UTILS in sys.modules:
    _copy_schema_into_new_sqlite_stores(sys.modules[_MLFLOW_DB_UTILS])
else:
    sys.meta_path.insert(0, _PatchMlflowStoreInit())


def _ray_group(item: pytest.Item | None) -> str | None:
    if item is None:
        return None
    path = Path(item.path).resolve()
    top = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else ""
    return RAY_GROUPS.get(top, str(path))  # elsewhere: each module on its own


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """A local Ray started in this process is shut down (after the fixtures' teardown) when the
    next test is in another group (see RAY_GROUPS) or there is none: a lingering instance holds
    Ray's default per-node ports, which a later test's own Ray (a CLI subprocess) needs."""
    try:
        return (yield)
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized() and _ray_group(nextitem) != _ray_group(item):
            ray.shutdown()


@pytest.fixture(scope="module")
def ray_local():
    """The local Ray of this group of test modules (2 CPUs, this machine's), started if none is
    running; never `ray stop` (others use Ray here), never someone else's cluster."""
    import ray

    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    return ray


@pytest.fixture
def tiny_config() -> LanceConfig:
    return LanceConfig.from_preset("tiny")


@pytest.fixture
def tiny_model(tiny_config) -> Lance:
    torch.manual_seed(0)
    model = Lance(tiny_config)
    model.init_weights()
    return model


@pytest.fixture
def builder() -> SequenceBuilder:
    return SequenceBuilder(ByteTokenizer())


def make_sample(task: str, hidden: int, seed: int = 0, caption: str | None = None) -> Sample:
    """A random sample of `task` with small latents (48 ch) / ViT tokens of width `hidden`."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lat = lambda t, h, w: torch.randn(48, t, h, w, generator=g)
    vit = lambda gt, gh, gw: Visual(vit_tokens=torch.randn(gt * (gh // 2) * (gw // 2), hidden, generator=g),
                                    vit_grid=(gt, gh, gw))
    caption = caption if caption is not None else f'sign with "{rng.choice(["OPEN", "STOP", "GO"])}"'
    if task == "t2i":
        return Sample("t2i", caption, target=Visual(latent=lat(1, 3, 4)))
    if task == "t2v":
        return Sample("t2v", caption, target=Visual(latent=lat(2, 3, 3)))
    if task == "i2v":
        return Sample("i2v", caption, target=Visual(latent=lat(3, 2, 3), clean_frames=1))
    if task in ("image_edit", "subject"):
        src = vit(1, 4, 6)
        src.latent = lat(1, 3, 4)
        src.latent_shape = (1, 3, 4)
        return Sample(task, "change the text to GO", source=src, target=Visual(latent=lat(1, 3, 4)))
    if task == "video_edit":
        src = vit(2, 4, 4)
        src.latent = lat(2, 2, 2)
        src.latent_shape = (2, 2, 2)
        return Sample(task, "make it red", source=src, target=Visual(latent=lat(2, 2, 2)))
    if task in ("i2t", "v2t"):
        grid = (1, 4, 4) if task == "i2t" else (2, 4, 4)
        return Sample(task, "What does the sign say?", answer=rng.choice(["OPEN", "STOP"]), source=vit(*grid))
    raise ValueError(task)


@pytest.fixture
def sample_factory():
    return make_sample
