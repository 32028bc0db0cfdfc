"""What the API and the workers share: the job contract, job records, the adapter and worker
registries, metrics, settings and storage backends.

Imports no torch and no web framework: service/ (the HTTP edge) and worker/ (the GPU side) both
build on it, and neither imports the other.
"""
