"""jobs: the `lance-pipeline` command line, job entrypoints and the end-to-end demo."""
