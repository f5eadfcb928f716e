"""The shared layer under the stage packages: what curation, training and RL all need.

- `config`: YAML + `key.sub=value` overrides -> typed, validated config objects (every family);
- `runtime`: connecting to a Ray cluster or starting a local one;
- `tracking`: MLflow runs (parent/child, resume by id, failure-tolerant);
- `schema`: the curated-shard format (versioned Parquet rows -> model samples).

Imports point one way: `jobs -> {data_curation, pipelines, rl} -> lance_platform -> lance_model`.
"""
