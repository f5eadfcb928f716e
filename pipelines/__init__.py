"""pipelines: staged backbone training (PT -> CT -> SFT) on Ray Train, tracked in MLflow."""
