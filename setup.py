"""spactor-jax: efficient pre-training objectives for T5-style models in JAX."""

import pathlib

import setuptools

_CORE = [
    'jax>=0.10.2,<0.12',  # 0.11 needs Python >= 3.12; tested there without TensorFlow
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'seqio>=0.0.20',
    't5>=0.9.4',
    # tensorflow-text (which seqio needs) requires the `tensorflow` wheel; a second,
    # `tensorflow-cpu`, would overwrite its files. GPUs are hidden from it (console.py).
    'tensorflow>=2.21,<2.22',
    'tensorflow-text>=2.21,<2.22',
    'tensorflow-datasets>=4.9.10',
    'sentencepiece>=0.2.0',
    'safetensors>=0.4',
    'gin-config>=0.5.0',
    'tensorboard>=2.20',
    'numpy>=2.0',
]

setuptools.setup(
    name='spactor-jax',
    version='0.1.0',
    description=('Pre-training T5-style models with efficient objectives: '
                 'SpacTor, COCO-LM, headless LMs, light generators.'),
    long_description=(pathlib.Path(__file__).parent / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['spactor_jax', 'spactor_jax.*', 'tasks', 'tasks.*']),
    package_data={'tasks': ['data/*'], '': ['*.gin']},
    include_package_data=True,
    install_requires=_CORE,
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3', 'matplotlib>=3.8'],
        'tpu': ['jax[tpu]>=0.10.2,<0.12'],
        'gpu': ['jax[cuda12]>=0.10.2,<0.12'],
        'plots': ['matplotlib>=3.8'],
    },
    entry_points={
        'console_scripts': [
            'spactor-train=spactor_jax.train:main',
            'spactor-aot=spactor_jax.aot:main',
            'spactor-eval=spactor_jax.eval:main',
            'spactor-generate=spactor_jax.generate:main',
            'spactor-finetune=spactor_jax.finetune:main',
            'spactor-convert=spactor_jax.convert:main',
            'spactor-prebuild=spactor_jax.prebuild:main',
        ],
    },
)
