"""T5.1.1 networks, after T5X's ``examples/t5/network.py``.

One frozen ``TransformerConfig`` is threaded through every module. Submodule
names are explicit so parameter paths are stable across objectives:
``token_embedder``, ``encoder``, ``decoder`` (and inside the stacks
``layers_{i}``, ``relpos_bias``, ``encoder_norm`` / ``decoder_norm``,
``logits_dense``).

With ``TransformerConfig.scan_layers`` each stack's layers run under
``nn.scan`` (one compiled layer body whatever the depth, as T5X's and
MaxText's ``scan_layers``): the parameters of all layers are stacked under
``layers`` with a leading layer axis (logical name ``'layers'``, mapped to
no mesh axis) instead of ``layers_0 .. layers_{n-1}``;
``scan_conversion`` converts between the two layouts.

Differences from T5X worth knowing: each stack owns *one* relative position
bias table shared by all its layers (as the original Mesh-TF T5 does), and
the decoder's padding is handled by the causal mask plus segment ids, since
packing is expressed with segment ids only.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from spactor_jax import errors
from spactor_jax import layers

Array = jax.Array

# Activations tagged with ``checkpoint_name`` in ``layers`` (the names
# ``remat_policy='save_named'`` may keep).
NAMED_ACTIVATIONS = ('query', 'key', 'value', 'attention_out', 'mlp_hidden')


def _remat_policy(name: str, saved_names: Tuple[str, ...]) -> Optional[Callable[..., Any]]:
  """The ``jax.checkpoint`` policy of a ``remat_policy`` name (None for 'none').

  * ``full``: save nothing, recompute the whole layer in the backward pass;
  * ``dots_saveable``: save every matmul output, recompute the rest;
  * ``minimal``: save the matmuls without batch dimensions (the projections,
    not the attention scores);
  * ``save_named``: save only the activations named in ``remat_saved_names``.
  """
  return {
      'none': None,
      'full': jax.checkpoint_policies.nothing_saveable,
      'dots_saveable': jax.checkpoint_policies.dots_saveable,
      'minimal': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
      'save_named': jax.checkpoint_policies.save_only_these_names(*saved_names),
  }[name]


REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'minimal', 'save_named')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of every network in this module (T5.1.1 by default).

  ``dtype`` and ``param_dtype`` accept dtype names (``'bfloat16'``), which is
  how gin files bind them; ``mlp_activations`` accepts a list.
  """
  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  mlp_activations: Tuple[str, ...] = ('gelu', 'linear')
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  logits_via_embedding: bool = False
  remat_policy: str = 'none'
  remat_saved_names: Tuple[str, ...] = ('attention_out', 'mlp_hidden')
  scan_layers: bool = False
  attention_impl: str = 'einsum'

  def __post_init__(self) -> None:
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype))
    object.__setattr__(self, 'param_dtype', jnp.dtype(self.param_dtype))
    object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))
    object.__setattr__(self, 'remat_saved_names', tuple(self.remat_saved_names))
    if self.remat_policy not in REMAT_POLICIES:
      raise errors.ConfigError(f'TransformerConfig.remat_policy must be one of {REMAT_POLICIES}, '
                               f'got {self.remat_policy!r}')
    unknown = sorted(set(self.remat_saved_names) - set(NAMED_ACTIVATIONS))
    if unknown:
      raise errors.ConfigError(f'TransformerConfig.remat_saved_names has unknown names {unknown}; '
                               f'choose among {NAMED_ACTIVATIONS}')
    if self.attention_impl not in layers.ATTENTION_IMPLS:
      raise errors.ConfigError(f'TransformerConfig.attention_impl must be one of '
                               f'{layers.ATTENTION_IMPLS}, got {self.attention_impl!r}')
    if self.attention_impl == 'dot_product_attention' and self.dropout_rate > 0:
      raise errors.ConfigError("attention_impl='dot_product_attention' has no attention-weights "
                               "dropout; set dropout_rate=0 or attention_impl='einsum'")

  def replace(self, **kwargs: Any) -> 'TransformerConfig':
    """A copy with the given fields changed."""
    return dataclasses.replace(self, **kwargs)


def _layer_class(layer_cls: type, config: TransformerConfig, num_layers: int,
                 deterministic_argnum: int, remat: bool = True) -> type:
  """The class of one layer (unscanned) or of the whole scanned stack.

  Wraps ``layer_cls`` in ``nn.remat`` according to ``config.remat_policy``
  (unless ``remat`` is False) and, with ``config.scan_layers``, in ``nn.scan``
  over ``num_layers`` layers whose parameters (and decoding ``cache``)
  gain a leading ``'layers'`` axis; every argument but the hidden states is
  broadcast to all layers. Instances of the scanned class take
  ``scanned=True`` and return ``(hidden, None)``.

  Args:
    layer_cls: the layer module class (``EncoderLayer`` or ``DecoderLayer``).
    config: the network config.
    num_layers: depth of the stack.
    deterministic_argnum: positional index of ``deterministic`` in
      ``__call__``, counting ``self`` as 0 (it must be static); it is the
      last argument.
    remat: apply ``config.remat_policy`` (decoding, which has no backward
      pass, does not).
  """
  policy = _remat_policy(config.remat_policy, config.remat_saved_names)
  if remat and config.remat_policy != 'none':
    layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not config.scan_layers,
                         static_argnums=(deterministic_argnum,))
  if not config.scan_layers:
    return layer_cls
  return nn.scan(layer_cls, variable_axes={'params': 0, 'cache': 0},
                 split_rngs={'params': True, 'dropout': True},
                 in_axes=(nn.broadcast,) * (deterministic_argnum - 1), length=num_layers,
                 metadata_params={nn.PARTITION_NAME: 'layers'})


def _dropout(config: TransformerConfig, x: Array, deterministic: bool) -> Array:
  """T5 dropout: one keep mask shared along the length axis."""
  return nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


def _norm(config: TransformerConfig, name: Optional[str] = None) -> layers.RMSNorm:
  return layers.RMSNorm(dtype=config.dtype, param_dtype=config.param_dtype, name=name)


def _attention(config: TransformerConfig, name: str, decode: bool = False,
               memory_cache: bool = False) -> layers.MultiHeadDotProductAttention:
  return layers.MultiHeadDotProductAttention(
      num_heads=config.num_heads, head_dim=config.head_dim, dropout_rate=config.dropout_rate,
      dtype=config.dtype, param_dtype=config.param_dtype, decode=decode,
      memory_cache=memory_cache, attention_impl=config.attention_impl, name=name)


def _mlp(config: TransformerConfig) -> layers.MlpBlock:
  return layers.MlpBlock(intermediate_dim=config.mlp_dim, activations=config.mlp_activations,
                         intermediate_dropout_rate=config.dropout_rate, dtype=config.dtype,
                         param_dtype=config.param_dtype, name='mlp')


def _relpos(config: TransformerConfig, bidirectional: bool,
            name: Optional[str] = None) -> layers.RelativePositionBiases:
  return layers.RelativePositionBiases(
      num_buckets=config.relative_attention_num_buckets,
      max_distance=config.relative_attention_max_distance, num_heads=config.num_heads,
      bidirectional=bidirectional, dtype=config.dtype, param_dtype=config.param_dtype,
      name=name)


def _constrain(x: Array) -> Array:
  return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


def _make_embedder(config: TransformerConfig) -> layers.Embed:
  return layers.Embed(num_embeddings=config.vocab_size, features=config.emb_dim,
                      dtype=config.dtype, param_dtype=config.param_dtype)


def _encoder_mask(tokens: Optional[Array], segment_ids: Optional[Array],
                  input_mask: Optional[Array]) -> Array:
  """Bidirectional self-attention mask ``[batch, 1, length, length]``.

  Validity comes from ``input_mask`` if given, else ``segment_ids > 0``, else
  ``tokens > 0``; with segment ids, tokens only see their own segment.
  """
  if input_mask is not None:
    valid = input_mask.astype(jnp.bool_)
  elif segment_ids is not None:
    valid = segment_ids > 0
  elif tokens is not None:
    valid = tokens > 0
  else:
    raise ValueError('The encoder needs encoder_input_tokens, encoder_segment_ids '
                     'or input_mask to build its attention mask.')
  mask = layers.make_attention_mask(valid, valid)
  if segment_ids is not None:
    mask = mask & layers.make_attention_mask(segment_ids, segment_ids, jnp.equal)
  return mask


def _decoder_self_mask(length: int, segment_ids: Optional[Array]) -> Array:
  """Causal (and same-segment) mask, ``[batch or 1, 1, length, length]``."""
  mask = layers.make_causal_mask(length)
  if segment_ids is not None:
    mask = mask & layers.make_attention_mask(segment_ids, segment_ids, jnp.equal)
  return mask


def _cross_mask(encoder_input_tokens: Array, encoder_segment_ids: Optional[Array],
                decoder_segment_ids: Optional[Array]) -> Array:
  """Decoder-to-encoder mask ``[batch, 1, tgt_len, in_len]``.

  Keys are the non-padding encoder tokens; with both segment ids given, a
  target token only sees inputs of its own segment.
  """
  key_valid = encoder_input_tokens > 0
  if encoder_segment_ids is not None:
    key_valid = key_valid & (encoder_segment_ids > 0)
  mask = key_valid[:, None, None, :]
  if encoder_segment_ids is not None and decoder_segment_ids is not None:
    mask = mask & layers.make_attention_mask(decoder_segment_ids, encoder_segment_ids, jnp.equal)
  return mask


class EncoderLayer(nn.Module):
  """Pre-norm self-attention + gated MLP block.

  Attributes:
    config: network config.
    scanned: return ``(hidden, None)``, the form ``nn.scan`` needs.
  """
  config: TransformerConfig
  scanned: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array, bias: Array, deterministic: bool) -> Array:
    """Args: ``x [batch, length, emb]``, ``mask [batch, 1, length, length]``,
    ``bias [1, heads, length, length]``. Returns ``[batch, length, emb]``."""
    cfg = self.config
    y = _norm(cfg, 'pre_attention_layer_norm')(x)
    y = _attention(cfg, 'attention')(y, y, mask, bias, deterministic)
    x = _constrain(x + _dropout(cfg, y, deterministic))
    y = _norm(cfg, 'pre_mlp_layer_norm')(x)
    y = _mlp(cfg)(y, deterministic)
    x = _constrain(x + _dropout(cfg, y, deterministic))
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, optional cross-attention, gated MLP.

  Attributes:
    config: network config.
    cross_attention: whether the layer attends to ``encoded``.
    scanned: return ``(hidden, None)``, the form ``nn.scan`` needs.
  """
  config: TransformerConfig
  cross_attention: bool = True
  # Decoding: self-attention keys and values in a KV cache, cross-attention
  # keys and values computed once (``encoded`` given) and then reused
  # (``encoded=None``).
  decode: bool = False
  scanned: bool = False

  @nn.compact
  def __call__(self, x: Array, encoded: Optional[Array], self_mask: Array, self_bias: Array,
               cross_mask: Optional[Array], deterministic: bool) -> Array:
    """Args: ``x [batch, tgt_len, emb]``, ``encoded [batch, in_len, emb]`` (None
    without cross-attention, or when decoding reuses the cached keys and values),
    ``self_mask [batch or 1, 1, tgt_len, tgt_len]``, ``self_bias [1, heads, tgt_len,
    tgt_len]``, ``cross_mask [batch, 1, tgt_len, in_len]``. Returns
    ``[batch, tgt_len, emb]``."""
    cfg = self.config
    y = _norm(cfg, 'pre_self_attention_layer_norm')(x)
    y = _attention(cfg, 'self_attention', self.decode)(y, y, self_mask, self_bias,
                                                       deterministic)
    x = _constrain(x + _dropout(cfg, y, deterministic))
    if self.cross_attention:
      y = _norm(cfg, 'pre_cross_attention_layer_norm')(x)
      y = _attention(cfg, 'encoder_decoder_attention', memory_cache=self.decode)(
          y, encoded, cross_mask, None, deterministic)
      x = _constrain(x + _dropout(cfg, y, deterministic))
    y = _norm(cfg, 'pre_mlp_layer_norm')(x)
    y = _mlp(cfg)(y, deterministic)
    x = _constrain(x + _dropout(cfg, y, deterministic))
    return (x, None) if self.scanned else x


class Encoder(nn.Module):
  """A stack of bidirectional encoder layers with one relative-position table.

  Attributes:
    config: network config.
    shared_embedding: token embedder; if None, inputs must come as
      ``input_embeddings``.
  """
  config: TransformerConfig
  shared_embedding: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, encoder_input_tokens: Optional[Array] = None,
               encoder_segment_ids: Optional[Array] = None, *, enable_dropout: bool = False,
               input_embeddings: Optional[Array] = None,
               input_mask: Optional[Array] = None) -> Array:
    """Encodes a batch.

    Args:
      encoder_input_tokens: ``[batch, length]`` int ids (0 = padding).
      encoder_segment_ids: ``[batch, length]`` packing segment ids (0 = padding).
      enable_dropout: training mode.
      input_embeddings: ``[batch, length, emb]``; replaces the token lookup.
      input_mask: ``[batch, length]`` bool validity; overrides the mask
        derived from segment ids or tokens.

    Returns:
      ``[batch, length, emb]`` final-normed hidden states.
    """
    cfg = self.config
    deterministic = not enable_dropout
    if input_embeddings is None:
      if self.shared_embedding is None or encoder_input_tokens is None:
        raise ValueError('The Encoder needs input_embeddings, or encoder_input_tokens '
                         'and a shared_embedding.')
      input_embeddings = self.shared_embedding(encoder_input_tokens.astype(jnp.int32))
    mask = _encoder_mask(encoder_input_tokens, encoder_segment_ids, input_mask)
    length = input_embeddings.shape[1]
    bias = _relpos(cfg, True, 'relpos_bias')(length, length)  # [1, heads, length, length]

    x = _dropout(cfg, input_embeddings.astype(cfg.dtype), deterministic)
    x = _constrain(x)  # [batch, length, emb]
    layer_cls = _layer_class(EncoderLayer, cfg, cfg.num_encoder_layers, deterministic_argnum=4)
    if cfg.scan_layers:
      x, _ = layer_cls(cfg, scanned=True, name='layers')(x, mask, bias, deterministic)
    else:
      for i in range(cfg.num_encoder_layers):
        x = layer_cls(cfg, name=f'layers_{i}')(x, mask, bias, deterministic)
    x = _norm(cfg, 'encoder_norm')(x)
    return _constrain(_dropout(cfg, x, deterministic))


class Decoder(nn.Module):
  """A stack of causal decoder layers, optionally cross-attending to an encoder.

  ``__call__`` returns hidden states; ``logits`` maps them to the vocabulary
  (the untied ``logits_dense`` is created only when ``logits`` is used, so a
  headless objective never owns one).

  Attributes:
    config: network config.
    shared_embedding: token embedder for the inputs (and the tied head).
    cross_attention: whether layers attend to ``encoded``.
    decode_length: None, or autoregressive decoding with a KV cache of this
      many positions (``spactor_jax.decoding``): ``init`` with
      ``[batch, decode_length]`` inputs creates the ``cache`` collection,
      then each call feeds the next tokens (no segment ids). With
      cross-attention, the first call's ``encoded`` is projected to keys and
      values once and kept in the cache; later calls pass ``encoded=None``.
  """
  config: TransformerConfig
  shared_embedding: nn.Module
  cross_attention: bool = True
  decode_length: Optional[int] = None

  def setup(self) -> None:
    cfg = self.config
    decode = self.decode_length is not None
    self.relpos_bias = _relpos(cfg, bidirectional=False)
    layer_cls = _layer_class(DecoderLayer, cfg, cfg.num_decoder_layers, deterministic_argnum=6,
                             remat=not decode)
    if cfg.scan_layers:  # parameters (and cache) under 'layers'
      self.layers = layer_cls(cfg, cross_attention=self.cross_attention, decode=decode,
                              scanned=True)
    else:  # parameters under 'layers_0', 'layers_1', ...
      self.layers = [layer_cls(cfg, cross_attention=self.cross_attention, decode=decode)
                     for _ in range(cfg.num_decoder_layers)]
    if decode:
      self.position = self.variable('cache', 'position', lambda: jnp.zeros((), jnp.int32))
    self.decoder_norm = _norm(cfg)
    self.embedding_dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    self.output_dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    if not cfg.logits_via_embedding:
      self.logits_dense = layers.DenseGeneral(
          cfg.vocab_size, kernel_axes=('embed', 'vocab'), dtype=cfg.dtype,
          param_dtype=cfg.param_dtype, output_dtype=jnp.float32)

  def __call__(self, decoder_input_tokens: Array, encoded: Optional[Array] = None,
               encoder_input_tokens: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               encoder_segment_ids: Optional[Array] = None, *,
               enable_dropout: bool = False) -> Array:
    """Decodes a batch with teacher forcing.

    Args:
      decoder_input_tokens: ``[batch, tgt_len]`` shifted-right targets.
      encoded: ``[batch, in_len, emb]`` encoder output (cross-attention only;
        None when decoding reuses the cached cross-attention keys and values).
      encoder_input_tokens: ``[batch, in_len]`` ids, for the cross mask.
      decoder_segment_ids: ``[batch, tgt_len]`` packing segment ids.
      encoder_segment_ids: ``[batch, in_len]`` packing segment ids.
      enable_dropout: training mode.

    Returns:
      ``[batch, tgt_len, emb]`` final-normed hidden states.
    """
    cfg = self.config
    deterministic = not enable_dropout
    length = decoder_input_tokens.shape[1]
    if self.decode_length is not None and not self.is_initializing():
      self_mask, self_bias = self._cached_mask_and_bias(length)
    else:
      self_mask = _decoder_self_mask(length, decoder_segment_ids)
      self_bias = self.relpos_bias(length, length)  # [1, heads, tgt_len, tgt_len]
    cross_mask = None
    if self.cross_attention:
      if (encoded is None and self.decode_length is None) or encoder_input_tokens is None:
        raise ValueError('A cross-attending Decoder needs encoded and encoder_input_tokens.')
      cross_mask = _cross_mask(encoder_input_tokens, encoder_segment_ids, decoder_segment_ids)

    x = self.shared_embedding(decoder_input_tokens.astype(jnp.int32))
    x = _constrain(self.embedding_dropout(x.astype(cfg.dtype), deterministic=deterministic))
    if self.config.scan_layers:
      x, _ = self.layers(x, encoded, self_mask, self_bias, cross_mask, deterministic)
    else:
      for layer in self.layers:
        x = layer(x, encoded, self_mask, self_bias, cross_mask, deterministic)
    x = self.decoder_norm(x)
    return _constrain(self.output_dropout(x, deterministic=deterministic))

  def _cached_mask_and_bias(self, length: int) -> Tuple[Array, Array]:
    """Queries at cache positions ``[p, p + length)`` over all ``decode_length`` slots.

    Returns the causal mask ``[1, 1, length, decode_length]`` (slots not yet
    written are in the future) and the bias ``[1, heads, length, decode_length]``;
    advances the position.
    """
    start = self.position.value
    queries = start + jnp.arange(length)
    mask = (jnp.arange(self.decode_length)[None, :] <= queries[:, None])[None, None]
    bias = self.relpos_bias(self.decode_length, self.decode_length)
    bias = jax.lax.dynamic_slice_in_dim(bias, start, length, axis=2)
    self.position.value = start + length
    return mask, bias

  def logits(self, hidden: Array) -> Array:
    """``[batch, length, emb] -> [batch, length, vocab]`` float32 logits (the
    product in ``config.dtype``, accumulated in float32)."""
    if self.config.logits_via_embedding:
      logits = layers.tied_logits(self.shared_embedding.attend, hidden)
    else:
      logits = self.logits_dense(hidden)
    return nn.with_logical_constraint(logits.astype(jnp.float32),
                                      ('batch', 'length', 'vocab'))


class TokenEmbeddingModel(nn.Module):
  """A network with a token embedding ``token_embedder`` that objectives read.

  Subclasses create ``token_embedder`` (``_make_embedder``) in ``setup``.
  """
  config: TransformerConfig

  def embed(self, tokens: Array) -> Array:
    """``[batch, length]`` ids -> ``[batch, length, emb]`` (no dropout)."""
    return self.token_embedder(tokens.astype(jnp.int32))

  def attend(self, hidden: Array) -> Array:
    """``[batch, length, emb] -> [batch, length, vocab]``: hidden times the embedding."""
    return self.token_embedder.attend(hidden)

  def tied_head(self) -> Callable[[Array], Array]:
    """The tied vocabulary head as a pure function of the current table.

    ``[batch, n, emb] -> [batch, n, vocab]`` float32 ``layers.tied_logits``
    (T5X's ``1/sqrt(emb)``); it calls no module, so it may run inside
    ``lax.cond`` or ``jax.checkpoint`` (``generator.masked_lm_sample``).
    """
    attend = functools.partial(layers.attend, self.token_embedder.embedding,
                               dtype=self.config.dtype)
    return functools.partial(layers.tied_logits, attend)


class EncoderDecoder(TokenEmbeddingModel):
  """T5.1.1 encoder-decoder with a shared token embedding.

  ``decode_length`` (None in training) switches on the decoder's caches
  (``Decoder``; ``decoding.greedy_decode``).
  """
  decode_length: Optional[int] = None

  def setup(self) -> None:
    self.token_embedder = _make_embedder(self.config)
    self.encoder = Encoder(self.config, shared_embedding=self.token_embedder)
    self.decoder = Decoder(self.config, shared_embedding=self.token_embedder,
                           decode_length=self.decode_length)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None, *,
             enable_dropout: bool = False,
             input_embeddings: Optional[Array] = None) -> Array:
    """Runs the encoder; returns ``[batch, in_len, emb]``.

    ``input_embeddings`` (``[batch, in_len, emb]``) replaces the token lookup;
    the tokens still define the padding mask.
    """
    return self.encoder(encoder_input_tokens, encoder_segment_ids,
                        enable_dropout=enable_dropout, input_embeddings=input_embeddings)

  def decode(self, encoded: Optional[Array], encoder_input_tokens: Array,
             decoder_input_tokens: Array,
             encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None, *,
             enable_dropout: bool = False) -> Array:
    """Runs the decoder on ``encoded``; returns ``[batch, tgt_len, vocab]`` float32 logits.

    With ``decode_length``, ``encoded=None`` reuses the cross-attention keys
    and values cached by an earlier call.
    """
    hidden = self.decoder(decoder_input_tokens, encoded, encoder_input_tokens,
                          decoder_segment_ids, encoder_segment_ids,
                          enable_dropout=enable_dropout)
    return self.decoder.logits(hidden)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None, *,
               enable_dropout: bool = False) -> Array:
    """Encodes then decodes; returns ``[batch, tgt_len, vocab]`` float32 logits."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       encoder_segment_ids, decoder_segment_ids,
                       enable_dropout=enable_dropout)


class EncoderOnly(TokenEmbeddingModel):
  """Bidirectional encoder with its own token embedding (ELECTRA, COCO-LM, RTS)."""

  def setup(self) -> None:
    self.token_embedder = _make_embedder(self.config)
    self.encoder = Encoder(self.config, shared_embedding=self.token_embedder)

  def __call__(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               *, enable_dropout: bool = False,
               input_embeddings: Optional[Array] = None) -> Array:
    """Returns ``[batch, length, emb]`` hidden states."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids,
                        enable_dropout=enable_dropout, input_embeddings=input_embeddings)


class DecoderOnly(TokenEmbeddingModel):
  """Causal LM with T5 relative position biases and no cross-attention.

  ``decode_length`` (None in training) switches on the decoder's KV cache.
  """
  decode_length: Optional[int] = None

  def setup(self) -> None:
    self.token_embedder = _make_embedder(self.config)
    self.decoder = Decoder(self.config, shared_embedding=self.token_embedder,
                           cross_attention=False, decode_length=self.decode_length)

  def logits(self, hidden: Array) -> Array:
    """``[batch, length, emb] -> [batch, length, vocab]`` float32 logits
    (``decoder/logits_dense``, or the tied embedding if ``logits_via_embedding``)."""
    return self.decoder.logits(hidden)

  def __call__(self, decoder_input_tokens: Array, decoder_segment_ids: Optional[Array] = None,
               *, enable_dropout: bool = False) -> Array:
    """Returns ``[batch, length, emb]`` hidden states."""
    return self.decoder(decoder_input_tokens, decoder_segment_ids=decoder_segment_ids,
                        enable_dropout=enable_dropout)
