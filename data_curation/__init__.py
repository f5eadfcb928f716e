"""data_curation: turning raw image/video-text corpora into curated, encoded training shards."""
