"""The HTTP edge of urae-serve: validate, authenticate, admit, enqueue, report, stream, serve files.

Nothing here imports torch, diffusers or the urae library: starting the API never loads a model.
"""
