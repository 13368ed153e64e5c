"""Fine-tuning heads: the objectives of a ``spactor_jax.finetune`` run.

Each keeps the pre-trained network under ``model`` (what ``ParamSource``
loads) and says how it predicts (``prediction``), which
``spactor_jax.downstream_eval`` uses to score the task's metric functions:

* ``TextToText`` (encoder-decoder): cross-entropy on ``targets`` per target
  token, as span corruption; predictions are greedy decodes of ``inputs``,
  turned into text (``'text'``).
* ``Classification`` (encoder-only): a head on the CLS position (the first
  token) of ``ClassificationFeatureConverter`` batches; cross-entropy per
  example over ``num_classes`` classes, or the squared error of one output
  (``num_classes = 1``, regression); predictions are the argmax (the value)
  (``'class'``).
* ``ChoiceScoring`` (decoder-only): one row per (example, choice) from
  ``ChoiceScoringFeatureConverter``; next-token cross-entropy on the
  ``loss_mask`` tokens of the rows of the right choice, per such token;
  predictions: the choice whose tokens have the highest summed
  log-likelihood (``'choice'``). A headless decoder gets its vocabulary head
  (``model/decoder/logits_dense``) from the route's gin file: not loaded,
  initialised from the embedding as ``LMTuning`` does.
"""

from typing import ClassVar, Dict, Mapping, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from spactor_jax import layers
from spactor_jax import losses
from spactor_jax import network
from spactor_jax.objectives import base
from spactor_jax.objectives import span_corruption

Array = jax.Array


@gin.configurable
class TextToText(base.Objective):
  """Encoder-decoder fine-tuning on ``inputs`` → ``targets``.

  Attributes:
    config: the T5 configuration.
    vocab: special ids of the task's vocabulary.
    z_loss: T5X's log-partition penalty coefficient.

  Metrics per target token: ``t2t_loss`` (cross-entropy plus z-loss),
  ``t2t_z_loss``, ``t2t_accuracy`` (teacher-forced argmax).
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  z_loss: float = 1e-4

  model_family = 'encoder_decoder'
  input_features = span_corruption.SpanCorruption.input_features
  prediction: ClassVar[str] = 'text'

  def setup(self):
    self.model = network.EncoderDecoder(self.config, name='model')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return base.target_denominators(batch)

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    logits = self.model(
        batch['encoder_input_tokens'], batch['decoder_input_tokens'],
        batch.get('encoder_segment_ids'), batch.get('decoder_segment_ids'),
        enable_dropout=enable_dropout)  # [batch, tgt_len, vocab]
    loss, metrics = span_corruption.span_corruption_loss(
        logits, batch, denominators['targets'], self.z_loss)
    return loss, {name.replace('sc_', 't2t_'): value for name, value in metrics.items()}


class ClassificationHead(nn.Module):
  """Dense, tanh, dropout, dense to the classes (BERT's pooler and classifier, bias-free).

  Attributes:
    config: the encoder configuration.
    num_classes: outputs (1: a regression value).
  """
  config: network.TransformerConfig
  num_classes: int

  @nn.compact
  def __call__(self, cls_hidden: Array, *, enable_dropout: bool) -> Array:
    """``[batch, emb]`` → ``[batch, num_classes]`` float32."""
    cfg = self.config
    x = layers.DenseGeneral(cfg.emb_dim, kernel_axes=('embed', 'mlp'), dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, name='dense')(cls_hidden)
    x = nn.with_logical_constraint(jnp.tanh(x), ('batch', 'mlp'))
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not enable_dropout)
    return layers.DenseGeneral(self.num_classes, kernel_axes=('mlp', None), dtype=jnp.float32,
                               param_dtype=cfg.param_dtype, name='out')(x)


@gin.configurable
class Classification(base.Objective):
  """Encoder-only classification (or regression) on the CLS representation.

  Attributes:
    config: the encoder configuration (``EncoderOnly``).
    vocab: special ids of the task's vocabulary.
    num_classes: classes; 1 makes it a regression with squared error.

  Metrics per example: ``cls_loss`` and, for classes, ``cls_accuracy``.
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo
  num_classes: int = 2

  model_family = 'encoder'
  input_features = ('encoder_input_tokens', 'label')
  prediction: ClassVar[str] = 'class'

  field_rules = {'num_classes': base.Rule(
      'a positive integer (1: regression)',
      lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 1)}

  def setup(self):
    self.model = network.EncoderOnly(self.config, name='model')
    self.cls_head = ClassificationHead(self.config, self.num_classes, name='cls_head')

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return {'examples': base.safe_denominator(batch['label'].shape[0])}

  def scores(self, batch: base.Batch, *, enable_dropout: bool = False) -> Array:
    """``[batch, num_classes]`` logits (regression: ``[batch, 1]`` values)."""
    hidden = self.model(batch['encoder_input_tokens'], batch.get('encoder_segment_ids'),
                        enable_dropout=enable_dropout)  # [batch, length, emb]
    return self.cls_head(hidden[:, 0], enable_dropout=enable_dropout)

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    outputs = self.scores(batch, enable_dropout=enable_dropout)
    label = batch['label'][:, 0]  # [batch]
    count = label.shape[0]
    if self.num_classes == 1:
      loss_sum = jnp.sum(jnp.square(outputs[:, 0] - label.astype(jnp.float32)))
      return loss_sum / denominators['examples'], {'cls_loss': base.metric(loss_sum, count)}
    log_probs = jax.nn.log_softmax(outputs)
    labels = label.astype(jnp.int32)
    loss_sum = -jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))
    correct = jnp.sum(jnp.argmax(outputs, axis=-1) == labels)
    metrics = {'cls_loss': base.metric(loss_sum, count),
               'cls_accuracy': base.metric(correct, count)}
    return loss_sum / denominators['examples'], metrics


@gin.configurable
class ChoiceScoring(base.Objective):
  """Decoder-only LM fine-tuning on the right choices; scoring of every choice.

  Attributes:
    config: the decoder configuration.
    vocab: special ids of the task's vocabulary.

  Metrics per trained token: ``choice_lm_loss``, ``choice_lm_accuracy``.
  """
  config: network.TransformerConfig
  vocab: base.VocabInfo

  model_family = 'decoder'
  input_features = ('decoder_input_tokens', 'decoder_target_tokens', 'decoder_loss_weights',
                    'choice', 'label')
  prediction: ClassVar[str] = 'choice'

  def setup(self):
    self.model = network.DecoderOnly(self.config, name='model')

  @staticmethod
  def _weights(batch: base.Batch) -> Array:
    """``[batch, length]``: the choice's tokens on rows of the right choice."""
    right = (batch['choice'] == batch['label']).astype(jnp.int32)  # [batch, 1]
    return batch['decoder_loss_weights'] * right

  def denominators(self, batch: base.Batch) -> Dict[str, Array]:
    return {'targets': base.safe_denominator(jnp.sum(self._weights(batch)))}

  def token_log_likelihoods(self, batch: base.Batch, *, enable_dropout: bool = False) -> Array:
    """``[batch, length]`` log p(target token | its prefix)."""
    hidden = self.model(batch['decoder_input_tokens'], batch.get('decoder_segment_ids'),
                        enable_dropout=enable_dropout)
    log_probs = jax.nn.log_softmax(self.model.logits(hidden))  # [batch, length, vocab]
    return jnp.take_along_axis(
        log_probs, batch['decoder_target_tokens'][..., None], axis=-1)[..., 0]

  def scores(self, batch: base.Batch) -> Array:
    """``[batch]`` summed log-likelihood of each row's ``loss_mask`` tokens."""
    return jnp.sum(self.token_log_likelihoods(batch) * batch['decoder_loss_weights'], axis=-1)

  def __call__(self, batch: base.Batch, denominators: Mapping[str, Array], *,
               enable_dropout: bool) -> Tuple[Array, base.Metrics]:
    hidden = self.model(batch['decoder_input_tokens'], batch.get('decoder_segment_ids'),
                        enable_dropout=enable_dropout)
    logits = self.model.logits(hidden)  # [batch, length, vocab]
    weights = self._weights(batch)
    loss_sum, _, correct = losses.cross_entropy_with_z_loss(
        logits, batch['decoder_target_tokens'], weights, 0.0)
    count = jnp.sum(weights)
    metrics = {'choice_lm_loss': base.metric(loss_sum, count),
               'choice_lm_accuracy': base.metric(correct, count)}
    return loss_sum / denominators['targets'], metrics
