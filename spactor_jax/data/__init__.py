"""The data side: seqio tasks (``tasks/``) → feature converters → iterators.

Import the modules themselves: ``source`` (``DataConfig``, the train loop's
input) and ``prebuilt`` need no TensorFlow; ``pipeline`` (the seqio path)
and ``feature_converters`` do.
"""
