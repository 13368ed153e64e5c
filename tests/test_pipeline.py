"""Tests of the input pipeline: exact resume, sharding, one-line config errors."""

import gzip

import jax
import numpy as np
import pytest
import seqio

from spactor_jax.data import pipeline
from spactor_jax.errors import ConfigError

SPACTOR = pipeline.DataConfig('pdtext_spactor', {'inputs': 64, 'targets': 16},
                              seed=5)


def _batches(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_streams_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize('config,family', [
    (SPACTOR, 'encoder_decoder'),
    (pipeline.DataConfig('pdtext_rts', {'inputs': 64}, seed=2), 'encoder'),
])
def test_resume_yields_the_identical_stream(tmp_path, config, family):
  shard = seqio.ShardInfo(0, 1)
  uninterrupted = _batches(pipeline.make_iterator(config, family, 4, shard), 7)
  first = pipeline.make_iterator(config, family, 4, shard)
  head = _batches(first, 3)
  first.save(str(tmp_path))
  resumed = pipeline.make_iterator(config, family, 4, shard)
  resumed.restore(str(tmp_path))
  _assert_streams_equal(uninterrupted, head + _batches(resumed, 4))
  # The restore matters: a fresh iterator would repeat the first batches.
  fresh = _batches(pipeline.make_iterator(config, family, 4, shard), 1)
  assert not np.array_equal(fresh[0]['encoder_input_tokens'],
                            uninterrupted[3]['encoder_input_tokens'])


def test_each_process_reads_its_own_shard(tmp_path):
  shards = [pipeline.make_iterator(SPACTOR, 'encoder_decoder', 8,
                                   seqio.ShardInfo(i, 2)) for i in range(2)]
  batches = [next(it) for it in shards]
  for it, batch in zip(shards, batches):
    assert batch['encoder_input_tokens'].shape == (4, 64)
    assert batch['encoder_mlm_mask'].shape == (4, 64)
    assert batch['decoder_target_tokens'].shape == (4, 16)
    assert it.element_spec['encoder_input_tokens'] == ((4, 64), np.int32)
  rows = [tuple(r) for b in batches for r in b['encoder_input_tokens']]
  assert len(set(rows)) == 8
  shards[1].save(str(tmp_path))
  assert (tmp_path / 'data_iterator.process_1-of-2.index').exists()
  with pytest.raises(ConfigError, match='process 0'):
    shards[0].restore(str(tmp_path))


def test_global_arrays_assemble_the_batch():
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ('data',))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec('data'))
  iterator = pipeline.make_iterator(SPACTOR, 'encoder_decoder', len(devices),
                                    seqio.ShardInfo(0, 1))
  local = next(iterator)
  arrays = pipeline.global_arrays(local, sharding)
  for k, v in local.items():
    assert arrays[k].sharding == sharding
    np.testing.assert_array_equal(np.asarray(arrays[k]), v)


def test_decoder_and_vocab_info():
  config = pipeline.DataConfig('pdtext_causal_lm', {'targets': 32})
  iterator = pipeline.make_iterator(config, 'decoder', 2, seqio.ShardInfo(0, 1),
                                    model_vocab_size=4096)
  batch = next(iterator)
  assert set(batch) == {'decoder_input_tokens', 'decoder_target_tokens',
                        'decoder_loss_weights', 'decoder_segment_ids',
                        'decoder_positions'}
  info = pipeline.vocab_info(iterator.vocabulary)
  assert (info.vocab_size, info.mask_id, info.first_sentinel_id) == (
      4068, 4068, 3968)


def test_user_corpus_through_gin_style_config(tmp_path):
  path = tmp_path / 'mine.txt.gz'
  with gzip.open(path, 'wt') as f:
    for i in range(300):
      f.write(f'Document {i} talks about the sea and the ships on it.\n')
  corpus = pipeline.TextCorpus('userdocs', train_files=[str(path)])
  config = pipeline.DataConfig('userdocs_spactor',
                               {'inputs': 64, 'targets': 16},
                               text_corpus=corpus)
  iterator = pipeline.make_iterator(config, 'encoder_decoder', 2,
                                    seqio.ShardInfo(0, 1))
  batch = next(iterator)
  assert batch['encoder_input_tokens'].shape == (2, 64)
  assert batch['encoder_mlm_mask'].any()
  text = iterator.vocabulary.decode(batch['encoder_input_tokens'][0].tolist())
  assert 'sea' in text or 'ships' in text


def _error(config, family='encoder_decoder', batch=4, shard=(0, 1),
           model_vocab_size=None):
  with pytest.raises(ConfigError) as info:
    pipeline.make_iterator(config, family, batch, seqio.ShardInfo(*shard),
                           model_vocab_size=model_vocab_size)
  message = str(info.value)
  assert '\n' not in message
  return message


def test_config_errors(tmp_path):
  sc = {'inputs': 64, 'targets': 16}
  assert 'pdtext_spactor' in _error(pipeline.DataConfig('pdtext_spactr', sc))
  assert 'needs 14' in _error(pipeline.DataConfig(
      'pdtext_span_corruption', {'inputs': 64, 'targets': 8}))
  assert 'too short' in _error(pipeline.DataConfig(
      'pdtext_span_corruption', {'inputs': 8, 'targets': 8}))
  assert 'at least 4069' in _error(pipeline.DataConfig('pdtext_spactor', sc),
                                   model_vocab_size=4068)
  assert 'divisible' in _error(pipeline.DataConfig('pdtext_spactor', sc),
                               batch=5, shard=(0, 2))
  assert 'does not fit' in _error(pipeline.DataConfig('pdtext_spactor', sc),
                                  family='encoder')
  assert 'lacks' in _error(pipeline.DataConfig('pdtext_mlm', {'targets': 64}),
                           family='encoder')
  assert 'no split' in _error(pipeline.DataConfig('pdtext_spactor', sc,
                                                  split='test'))
  missing = pipeline.TextCorpus('nofiles', [str(tmp_path / 'none*.txt')])
  assert 'no file' in _error(pipeline.DataConfig(
      'nofiles_span_corruption', sc, text_corpus=missing))
  (tmp_path / 'blank.txt').write_text('\n  \n')
  empty = pipeline.TextCorpus('blank', [str(tmp_path / 'blank.txt')])
  assert 'empty' in _error(pipeline.DataConfig(
      'blank_span_corruption', sc, text_corpus=empty))
  bad_vocab = pipeline.TextCorpus('badvocab', [str(tmp_path / 'blank.txt')],
                                  vocabulary_path=str(tmp_path / 'x.model'))
  (tmp_path / 'blank.txt').write_text('some text\n')
  assert 'cannot load vocabulary' in _error(pipeline.DataConfig(
      'badvocab_span_corruption', sc, text_corpus=bad_vocab),
                                            model_vocab_size=4096)
