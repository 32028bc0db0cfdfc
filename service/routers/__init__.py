"""One router per resource: generate, jobs, adapters, finetune, health."""
