"""``urae-serve``: the whole stack (Redis, API, workers) as local processes, with one command."""
