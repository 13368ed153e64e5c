"""The data side: seqio tasks (``tasks/``) → feature converters → iterators."""

from spactor_jax.data.pipeline import DataConfig
from spactor_jax.data.pipeline import DataIterator
from spactor_jax.data.pipeline import global_arrays
from spactor_jax.data.pipeline import make_iterator
from spactor_jax.data.pipeline import TextCorpus
from spactor_jax.data.pipeline import vocab_info
