"""A procedural world of captioned shapes, rendered exactly at any resolution and judged automatically.

:mod:`urae.world.scene` samples scenes and writes and reads their captions, :mod:`urae.world.render`
draws a scene at any size, :mod:`urae.world.judge` scores an image against its caption, and
:mod:`urae.world.teacher` serves the renderer through the synthetic-data teacher protocol.
"""
