"""The shared layer under the stage packages: what curation, training and RL all need.

- `config`: YAML + `key.sub=value` overrides -> typed, validated config objects (every family);
- `runtime`: connecting to a Ray cluster or starting a local one;
- `tracking`: MLflow runs (parent/child, resume by id, failure-tolerant);
- `logs`: quiet non-interactive consoles, full Ray / Ray Data logs in files under the work dir;
- `schema`: the curated-shard format (versioned Parquet rows -> model samples, checksums, tokenizer);
- `checkpoint`: the one training-state checkpoint format of training and RL (no pickle, verified);
- `lora`: LoRA adapters on the backbone (through peft), adapter checkpoints and merging.
- `parallel`: FSDP2 wrapping, shard-by-shard filling and the collective helpers (training and RL).

Imports point one way: `jobs -> {data_curation, pipelines, rl} -> lance_platform -> lance_model`.
"""
