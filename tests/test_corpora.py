"""C4's selectable TFDS version and its missing-data hint; JSON Lines corpora."""

import gzip
import json
import subprocess
import sys

import gin
import pytest
import seqio

import helpers
from helpers import fresh_gin  # pylint: disable=unused-import
import tasks  # pylint: disable=unused-import
from spactor_jax import errors
from tasks import corpora


def test_c4_tfds_version_is_selectable():
  task = seqio.get_mixture_or_task('c4_span_corruption')
  assert task.source.tfds_dataset.name == 'c4/en:3.1.0'
  gin.bind_parameter('tasks.c4_tfds_version.version', '2.2.0')  # T5's c4_v220_* tasks
  assert task.source.tfds_dataset.name == 'c4/en:2.2.0'


_MISSING_C4 = '''
import sys
import gin, seqio
import tasks
from spactor_jax import errors
from spactor_jax.data import pipeline
for version in ('3.1.0', '2.2.0'):
  gin.bind_parameter('tasks.c4_tfds_version.version', version)
  try:
    pipeline.make_iterator(pipeline.DataConfig('c4_span_corruption', {'inputs': 32, 'targets': 8}),
                           'encoder_decoder', 8, seqio.ShardInfo(0, 1))
  except errors.ConfigError as e:
    print(e)
'''


def test_missing_c4_data_names_the_tfds_build_command(tmp_path):
  result = subprocess.run(
      [sys.executable, '-c', _MISSING_C4], capture_output=True, text=True,
      env=helpers.subprocess_env(1, TFDS_DATA_DIR=str(tmp_path)), timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  hint = ('TFDS dataset c4/en:{} is not prepared in {}; build it with `tfds build {} '
          '--data_dir={}` (downloads once) or set TFDS_DATA_DIR to a directory that holds it')
  assert result.stdout.splitlines() == [
      hint.format('3.1.0', tmp_path, 'c4/en', tmp_path),
      hint.format('2.2.0', tmp_path, 'c4/en:2.2.0', tmp_path)]


DOCUMENTS = ['a first "quoted" document\nover two lines', 'second: caf\u00e9 \u2603', 'third']


def _write_json_lines(path, rows):
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n\n')


def test_json_lines_corpus_reads_the_named_field(tmp_path):
  _write_json_lines(tmp_path / 'c4-train.00000-of-00001.json.gz',
                    [{'text': text, 'url': f'https://example.org/{i}', 'timestamp': '2019'}
                     for i, text in enumerate(DOCUMENTS)])
  corpus = corpora.TextCorpus(name='jsonl', train_files=[str(tmp_path / '*.json.gz')],
                              text_field='text')
  corpora.register_text_corpus(corpus)
  task = seqio.get_mixture_or_task('jsonl_causal_lm')
  vocabulary = task.output_features['targets'].vocabulary
  ds = task.get_dataset({'targets': 512}, split='train', shuffle=False)
  texts = [vocabulary.decode(ex['targets'][:-1].tolist()) for ex in ds.as_numpy_iterator()]
  assert texts == [vocabulary.decode(vocabulary.encode(text)) for text in DOCUMENTS]


@pytest.mark.parametrize('field, words', [
    (None, ('looks like JSON Lines', 'text_field')),
    ('body', ("no text field 'body'", 'its keys: text, url')),
])
def test_json_lines_without_the_field_is_one_line_error(tmp_path, field, words):
  _write_json_lines(tmp_path / 'docs.jsonl.gz', [{'text': 'x', 'url': 'u'}])
  corpus = corpora.TextCorpus(name='bad', train_files=[str(tmp_path / 'docs.jsonl.gz')],
                              text_field=field)
  with pytest.raises(errors.ConfigError) as error:
    corpora.register_text_corpus(corpus)
  assert '\n' not in str(error.value) and all(w in str(error.value) for w in words)
