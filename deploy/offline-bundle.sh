#!/usr/bin/env bash
# Builds an offline bundle for running the pipelines on a GPU machine that has PyTorch but no
# package index (an air-gapped node, a locked-down image): Ray (Data, Train, Tune; its Java jars,
# RLlib, Serve, the LLM library and the dashboard's web client dropped), RapidOCR with the PP-OCR
# models its wheel ships, and the pure-Python dependencies such an image usually lacks. The two
# large parts are xz tarballs (Ray's binaries compress to about 60% of their wheel size). About
# 60 MiB in all; run from the repository root on a machine with pip and the index:
#   deploy/offline-bundle.sh [out_dir]          (default .offline; git-ignore it)
# and on the GPU machine, with out_dir copied there:
#   mkdir -p /tmp/site && tar xJf out_dir/ray.tar.xz -C /tmp/site && tar xJf out_dir/rapidocr.tar.xz -C /tmp/site
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site out_dir/wheels/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   python3 -m jobs.cli recipe --config configs/recipes/text_rendering/recipe.yaml tracking=false ...
# VIDEO=1 also puts the video-curation wheels such an image lacks into out_dir/video (decord with its
# own FFmpeg, PySceneDetect; about 14 MiB), for video curation there (benchmarks/bench_video_curation.py):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site out_dir/video/*.whl
set -euo pipefail
out=${1:-.offline}
py=${PYTHON:-python3}
dl() { "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
       --platform manylinux2014_x86_64 -d "$1" "${@:2}"; }
ray_spec=$(grep -o '"ray\[[^]]*\][^"]*"' pyproject.toml | sed 's/"ray\[[^]]*\]//; s/"//g; s/ //g')
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out/wheels" "$tmp/ray" "$tmp/ocr"
dl "$tmp" "ray${ray_spec}" "rapidocr>=3.0"
(cd "$tmp/ray" && "$py" -m zipfile -e "$tmp"/ray-*.whl . && rm -rf ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client/build)
(cd "$tmp/ocr" && "$py" -m zipfile -e "$tmp"/rapidocr-*.whl .)
chmod +x "$tmp"/ray/ray/core/src/ray/gcs/gcs_server "$tmp"/ray/ray/core/src/ray/raylet/raylet
tar cf - -C "$tmp/ray" . | xz -T0 -7 > "$out/ray.tar.xz"
tar cf - -C "$tmp/ocr" . | xz -T0 -6 > "$out/rapidocr.tar.xz"
# Ray's and RapidOCR's pure dependencies that a PyTorch image usually lacks; the project's own
# (pydantic) too. A package the machine already has is harmless here: --target keeps both apart.
dl "$out/wheels" jsonschema jsonschema-specifications referencing rpds-py pydantic pydantic-core annotated-types \
   typing-inspection pyclipper shapely omegaconf colorlog
if [ "${VIDEO:-0}" = 1 ]; then
  mkdir -p "$out/video"
  dl "$out/video" decord scenedetect platformdirs
fi
du -sh "$out"
