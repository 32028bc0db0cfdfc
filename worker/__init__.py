"""RQ workers: a resident generation worker per GPU, and an isolated fine-tune worker."""
