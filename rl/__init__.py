"""rl: Flow-GRPO reward tuning with OCR reward actors."""
