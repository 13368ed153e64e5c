"""seqio tasks of spactor-jax; importing this package registers all of them.

Registered: ``{corpus}_{family}`` for corpus in ``c4`` (TFDS ``c4/en``, version
``tasks.c4_tfds_version.version``, default 3.1.0; T5's cc_all.32000 vocabulary,
path gin-configurable through ``tasks.c4_vocabulary_path.path``) and ``pdtext`` (the shipped public-domain
corpus and its SentencePiece model), and family in ``corpora.FAMILIES``.
A user's own text files get the same family through ``corpora.TextCorpus``.
The offline downstream tasks (``downstream.ROUTES``) and GLUE / SuperGLUE
(``glue``: ``glue_{name}_t2t``, ``glue_{name}_cls``, ``super_glue_{name}_t2t``)
are registered too.
"""

from tasks import corpora
from tasks import downstream
from tasks import glue
from tasks import preprocessors
from tasks import tfds_sources
from tasks import vocab

corpora.register_builtin()
downstream.register()
glue.register()
