"""Replaced-token features as seqio preprocessors.

Every random choice uses stateless TF ops seeded through
``seqio.map_over_dataset(num_seeds=...)``, so a task's output is a function of
the seed passed to ``get_dataset`` alone.

Features written (all ``[length]`` int32, aligned with ``inputs``):

* ``mlm_mask``: 1 at the selected positions: a fraction ``rate`` of the
  *eligible* tokens (randomly rounded, so the expected rate is exact); pad,
  EOS, UNK, sentinels and ids at or above the mask id are never eligible.
* For encoder-only tasks, ``targets`` is the CLS id followed by the original
  tokens (so every example, and every segment of a packed row, starts with
  the sequence-level position), and ``inputs`` is the corrupted copy of
  ``targets``; the CLS id is special, so it is never selected or replaced.
"""

from typing import Mapping, Sequence

import gin
import seqio
import t5.data.preprocessors as t5_preprocessors
import tensorflow as tf

from tasks import vocab as vocab_lib
from spactor_jax.basics import VocabInfo

POLICIES = ('bert', 'mask', 'random')


def select_positions(tokens: tf.Tensor, rate: float, seed: tf.Tensor,
                     info: VocabInfo) -> tf.Tensor:
  """Chooses ``rate * num_eligible`` eligible positions uniformly.

  The count is ``rate * num_eligible`` rounded down or up at random (up with
  probability equal to the fractional part), so the expected rate is exactly
  ``rate`` even for short sequences.

  Args:
    tokens: ``[length]`` int32 token ids.
    rate: fraction of eligible tokens to select.
    seed: ``[2]`` stateless seed.
    info: the vocabulary's special ids.

  Returns:
    ``[length]`` int32, 1 at the selected positions.
  """
  eligible = tf.logical_not(info.is_special(tokens))
  num_eligible = tf.reduce_sum(tf.cast(eligible, tf.float32))
  draws = tf.random.stateless_uniform([tf.size(tokens) + 1], seed=seed)
  num_selected = tf.cast(tf.floor(rate * num_eligible + draws[-1]), tf.int32)
  scores = tf.where(eligible, draws[:-1], 2.0)  # ineligible tokens sort last
  rank = tf.argsort(tf.argsort(scores, stable=True), stable=True)
  return tf.cast(rank < num_selected, tf.int32)


def random_tokens(shape: tf.Tensor, seed: tf.Tensor,
                  info: VocabInfo) -> tf.Tensor:
  """Uniform non-special token ids: above pad/EOS/UNK, below the sentinels."""
  first_regular = max(info.pad_id, info.eos_id, info.unk_id) + 1
  return tf.random.stateless_uniform(
      shape, seed=seed, minval=first_regular, maxval=info.first_sentinel_id,
      dtype=tf.int32)


def corrupt(tokens: tf.Tensor, selected: tf.Tensor, policy: str,
            seeds: Sequence[tf.Tensor], info: VocabInfo,
            mask_prob: float = 0.8, random_prob: float = 0.1) -> tf.Tensor:
  """Replaces the selected tokens according to a policy.

  Args:
    tokens: ``[length]`` original ids.
    selected: ``[length]`` 0/1 from ``select_positions``.
    policy: ``'bert'`` (``mask_prob`` mask id, ``random_prob`` random token,
      the rest unchanged), ``'mask'`` (all mask id) or ``'random'`` (all random
      non-special tokens, as RTS and SLM need).
    seeds: two ``[2]`` stateless seeds.
    info: the vocabulary's special ids.
    mask_prob: for ``'bert'``, the probability of the mask id.
    random_prob: for ``'bert'``, the probability of a random token.

  Returns:
    ``[length]`` int32 corrupted ids.
  """
  if policy not in POLICIES:
    raise ValueError(f'unknown corruption policy {policy!r}; use one of '
                     f'{POLICIES}')
  selected = tf.cast(selected, tf.bool)
  shape = tf.shape(tokens)
  replacement = random_tokens(shape, seeds[1], info)
  if policy == 'mask':
    return tf.where(selected, info.mask_id, tokens)
  if policy == 'random':
    return tf.where(selected, replacement, tokens)
  draw = tf.random.stateless_uniform(shape, seed=seeds[0])
  replacement = tf.where(draw < mask_prob, info.mask_id,
                         tf.where(draw < mask_prob + random_prob, replacement,
                                  tokens))
  return tf.where(selected, replacement, tokens)


def split_tokens_for_encoder(dataset: tf.data.Dataset,
                             sequence_length: Mapping[str, int],
                             output_features: Mapping[str, seqio.Feature]
                             ) -> tf.data.Dataset:
  """Splits ``targets`` into chunks that leave room for the CLS id and EOS.

  Like ``t5.data.preprocessors.split_tokens_to_inputs_length``, with one
  more slot reserved: chunks of ``sequence_length['inputs'] - 2`` tokens
  become examples of exactly the inputs length once ``append_eos`` and
  ``corrupt_for_encoder`` have added EOS and CLS.

  Args:
    dataset: examples with ``targets`` ``[n]`` (concatenated documents).
    sequence_length: the task feature lengths; ``inputs`` is used.
    output_features: the task's features (``targets`` must add EOS).

  Returns:
    Examples with ``targets`` of at most ``inputs - 2`` tokens.
  """
  if not output_features['targets'].add_eos:
    raise ValueError('split_tokens_for_encoder expects targets with add_eos')
  return t5_preprocessors.split_tokens(
      dataset, max_tokens_per_segment=sequence_length['inputs'] - 2)


def prepend_cls(tokens: tf.Tensor, info: VocabInfo) -> tf.Tensor:
  """``[n]`` ids → ``[n + 1]``: the CLS id, then the tokens."""
  return tf.concat([tf.constant([info.cls_id], tokens.dtype), tokens], axis=0)


@gin.configurable(module='tasks', denylist=['dataset', 'output_features'])
def add_mlm_mask(dataset: tf.data.Dataset,
                 output_features: Mapping[str, seqio.Feature],
                 rate: float = 0.15) -> tf.data.Dataset:
  """Adds ``mlm_mask``: the encoder positions SpacTor's generator will mask.

  Runs after span corruption, on the final ``inputs`` (sentinels and EOS
  included); ``inputs`` and ``targets`` are left unchanged.

  Args:
    dataset: examples with ``inputs`` ``[length]``.
    output_features: the task's features (for the vocabulary).
    rate: fraction of eligible ``inputs`` tokens to select.

  Returns:
    The dataset with ``mlm_mask`` ``[length]`` int32 added.
  """
  info = vocab_lib.vocab_info(output_features['inputs'].vocabulary)

  @seqio.map_over_dataset(num_seeds=1)
  def add(features, seed):
    features = dict(features)
    features['mlm_mask'] = select_positions(features['inputs'], rate, seed,
                                            info)
    return features

  return add(dataset)


@gin.configurable(module='tasks',
                  denylist=['dataset', 'output_features', 'policy'])
def corrupt_for_encoder(dataset: tf.data.Dataset,
                        output_features: Mapping[str, seqio.Feature],
                        policy: str, rate: float = 0.15,
                        mask_prob: float = 0.8,
                        random_prob: float = 0.1) -> tf.data.Dataset:
  """Builds encoder-only features from ``targets`` (the original tokens).

  The CLS id is put in front of the tokens first; being special, it is
  never selected, so ``mlm_mask`` is 0 there and ``inputs`` keeps it.

  Args:
    dataset: examples with ``targets`` ``[n]`` (EOS included).
    output_features: the task's features (for the vocabulary).
    policy: ``'bert'``, ``'mask'`` or ``'random'``; see ``corrupt``.
    rate: fraction of eligible tokens to select.
    mask_prob: for ``'bert'``, the probability of the mask id.
    random_prob: for ``'bert'``, the probability of a random token.

  Returns:
    Examples with ``inputs`` (corrupted), ``targets`` (CLS and the
    originals) and ``mlm_mask``, each ``[n + 1]`` int32.
  """
  info = vocab_lib.vocab_info(output_features['targets'].vocabulary)

  @seqio.map_over_dataset(num_seeds=3)
  def build(features, seeds):
    tokens = prepend_cls(features['targets'], info)
    selected = select_positions(tokens, rate, seeds[0], info)
    return {
        'inputs': corrupt(tokens, selected, policy, seeds[1:], info,
                          mask_prob, random_prob),
        'targets': tokens,
        'mlm_mask': selected,
    }

  return build(dataset)
