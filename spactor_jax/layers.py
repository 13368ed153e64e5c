"""Flax linen building blocks of T5.1.1, after T5X's ``examples/t5/layers.py``.

Every parameter is created through ``nn.with_logical_partitioning`` and the
main activations are constrained with ``nn.with_logical_constraint``, so the
same modules run unsharded on one CPU and sharded on a pod once logical axis
rules are in scope. Logical names used here:

* parameters: ``vocab, embed, joined_kv, mlp, heads, relpos_buckets``;
* activations: ``batch, length, embed, heads, kv, mlp, vocab``.

No layer has a bias. ``dtype`` is the activation dtype, ``param_dtype`` the
storage dtype of the parameters.
"""

import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]
Axes = Tuple[Optional[str], ...]

# Value added to attention logits of masked-out pairs (T5X uses the same).
NEG_INF = -1e10

default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
attention_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
embedding_init = nn.initializers.normal(stddev=1.0)
relpos_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')


def _canonical_tuple(x: Union[int, Sequence[int]]) -> Tuple[int, ...]:
  return tuple(x) if isinstance(x, Sequence) else (x,)


def _activation(name: str) -> Callable[[Array], Array]:
  """Maps a T5X activation name ('gelu', 'relu', 'linear', ...) to a function."""
  if name == 'linear':
    return lambda x: x
  fn = getattr(nn, name, None)
  if fn is None:
    raise ValueError(f'Unknown MLP activation {name!r}.')
  return fn


# ------------------------------------------------------------------ masks ---


def make_attention_mask(query_valid: Array, key_valid: Array,
                        pairwise_fn: Callable[[Array, Array], Array] = jnp.logical_and
                        ) -> Array:
  """Pairwise attention mask.

  Args:
    query_valid: ``[batch, q_len]`` values for the queries.
    key_valid: ``[batch, k_len]`` values for the keys.
    pairwise_fn: combines a query value with a key value (``logical_and`` for
      validity masks, ``equal`` for segment ids).

  Returns:
    ``[batch, 1, q_len, k_len]`` bool mask.
  """
  mask = pairwise_fn(query_valid[:, :, None], key_valid[:, None, :])
  return mask[:, None, :, :].astype(jnp.bool_)


def make_causal_mask(length: int) -> Array:
  """``[1, 1, length, length]`` bool mask, True where key position <= query position."""
  idx = jnp.arange(length)
  return (idx[None, :] <= idx[:, None])[None, None]


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
  """Logical AND of the masks that are not None (None if all are None)."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  return functools.reduce(jnp.logical_and, masks)


def mask_to_bias(mask: Array) -> Array:
  """Bool mask -> float32 additive bias (0 where True, ``NEG_INF`` where False)."""
  return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


# -------------------------------------------------------------- attention ---


def dot_product_attention(query: Array, key: Array, value: Array,
                          bias: Optional[Array] = None, *,
                          dropout_rng: Optional[Array] = None,
                          dropout_rate: float = 0.0,
                          dtype: DType = jnp.float32) -> Array:
  """Unscaled dot-product attention with a float32 softmax (T5 style).

  The 1/sqrt(head_dim) scaling is folded into the query kernel's
  initialisation, so none is applied here.

  Args:
    query: ``[batch, q_len, heads, head_dim]``.
    key: ``[batch, k_len, heads, head_dim]``.
    value: ``[batch, k_len, heads, head_dim]``.
    bias: additive bias broadcastable to ``[batch, heads, q_len, k_len]``
      (relative position bias plus ``mask_to_bias`` of the mask).
    dropout_rng: key for dropout on the attention weights; None disables it.
    dropout_rate: dropout probability of the attention weights. As in T5X the
      keep mask is broadcast along the query axis.
    dtype: dtype of the returned values and of the value product.

  Returns:
    ``[batch, q_len, heads, head_dim]`` attended values.
  """
  # [batch, heads, q_len, k_len]
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key,
                      preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1)
  if dropout_rng is not None and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    keep_shape = weights.shape[:-2] + (1,) + weights.shape[-1:]
    keep = jax.random.bernoulli(dropout_rng, keep_prob, keep_shape)
    weights = jnp.where(keep, weights / keep_prob, 0.0)
  weights = weights.astype(dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, value.astype(dtype))


ATTENTION_IMPLS = ('einsum', 'dot_product_attention')


def fused_dot_product_attention(query: Array, key: Array, value: Array,
                                bias: Optional[Array], mask: Optional[Array],
                                dtype: DType = jnp.float32) -> Array:
  """The same attention through ``jax.nn.dot_product_attention``.

  On GPU JAX picks cuDNN's fused (flash) kernel when the shapes and dtypes
  allow it and XLA's composition otherwise; on CPU and TPU it is XLA's
  composition (logits with float32 accumulation, float32 softmax). No
  dropout on the attention weights.

  Args:
    query: ``[batch, q_len, heads, head_dim]``.
    key: ``[batch, k_len, heads, head_dim]``.
    value: ``[batch, k_len, heads, head_dim]``.
    bias: float, broadcastable to ``[batch, heads, q_len, k_len]`` (T5's
      relative position bias), or None.
    mask: bool, broadcastable to ``[batch, heads, q_len, k_len]``, or None.
    dtype: dtype of the inputs and of the result.

  Returns:
    ``[batch, q_len, heads, head_dim]`` attended values.
  """
  query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
  if bias is not None:
    bias = jnp.asarray(bias, dtype)
  return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=1.0)


class DenseGeneral(nn.Module):
  """Bias-free dense layer over one or more input axes (T5X ``DenseGeneral``).

  The kernel is stored flattened as ``[prod(in_dims), prod(features)]`` so its
  logical names are two-dimensional, e.g. ``('embed', 'joined_kv')``.

  Attributes:
    features: output feature shape.
    kernel_axes: logical names of the (flattened, rank-2) kernel.
    axis: input axes contracted.
    kernel_init: initializer called with the flattened shape.
    dtype: computation dtype.
    param_dtype: kernel storage dtype.
    output_dtype: dtype of the result (the product accumulates in it); None
      means ``dtype``. Heads use float32 with bfloat16 inputs.
  """
  features: Union[int, Tuple[int, ...]]
  kernel_axes: Axes
  axis: Union[int, Tuple[int, ...]] = -1
  kernel_init: Initializer = default_kernel_init
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  output_dtype: Optional[DType] = None

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """``[..., *in_dims] -> [..., *features]``."""
    features = _canonical_tuple(self.features)
    axis = tuple(a % inputs.ndim for a in _canonical_tuple(self.axis))
    in_dims = tuple(inputs.shape[a] for a in axis)
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
        (math.prod(in_dims), math.prod(features)), self.param_dtype)
    kernel = jnp.asarray(kernel, self.dtype).reshape(in_dims + features)
    contract = (axis, tuple(range(len(axis))))
    return jax.lax.dot_general(jnp.asarray(inputs, self.dtype), kernel,
                               (contract, ((), ())),
                               preferred_element_type=self.output_dtype)


class RMSNorm(nn.Module):
  """T5 layer norm: rescale by the root mean square, no mean, no bias.

  Attributes:
    epsilon: added to the mean square.
    dtype: output dtype (the statistics are computed in float32).
    param_dtype: scale storage dtype.
  """
  epsilon: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """``[..., emb_dim] -> [..., emb_dim]``."""
    x = jnp.asarray(x, jnp.float32)
    mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = jnp.asarray(x * jax.lax.rsqrt(mean_square + self.epsilon), self.dtype)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), self.param_dtype)
    return y * jnp.asarray(scale, self.dtype)


class Embed(nn.Module):
  """Token embedding table, also usable as a tied output projection.

  Attributes:
    num_embeddings: vocabulary size (rows).
    features: embedding width.
    dtype: dtype of looked-up embeddings and of ``attend``.
    param_dtype: table storage dtype.
    embedding_init: table initializer.
  """
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  embedding_init: Initializer = embedding_init

  def setup(self) -> None:
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(self.embedding_init, ('vocab', 'embed')),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, tokens: Array) -> Array:
    """``[batch, length]`` int ids -> ``[batch, length, features]``."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'Embed expects integer token ids, got {tokens.dtype}.')
    out = jnp.take(jnp.asarray(self.embedding, self.dtype), tokens, axis=0)
    return nn.with_logical_constraint(out, ('batch', 'length', 'embed'))

  def attend(self, query: Array) -> Array:
    """``[..., features] -> [..., num_embeddings]`` float32: query times the table
    transposed (in ``dtype``, accumulated and returned in float32)."""
    return attend(self.embedding, query, self.dtype)


def attend(table: Array, query: Array, dtype: DType) -> Array:
  """``[..., features] -> [..., vocab]`` float32 product with ``table [vocab, features]``.

  A pure function of the table, so callers may use it inside JAX transforms
  (``lax.cond``, ``jax.checkpoint``) with the table as a traced value.
  """
  return jnp.dot(jnp.asarray(query, dtype), jnp.asarray(table, dtype).T,
                 preferred_element_type=jnp.float32)


def tied_logits(attend: Callable[[Array], Array], hidden: Array) -> Array:
  """Vocabulary logits through a tied embedding, with T5X's scaling.

  Args:
    attend: ``[..., emb] -> [..., vocab]`` product with the embedding table
      (``Embed.attend``, or ``functools.partial(attend, table, dtype=...)``).
    hidden: ``[batch, length, emb]``.

  Returns:
    ``[batch, length, vocab]`` float32 logits ``hidden @ E^T / sqrt(emb)``.
  """
  logits = attend(hidden).astype(jnp.float32) / jnp.sqrt(jnp.float32(hidden.shape[-1]))
  return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
  """T5's bucketing of ``memory_position - query_position``.

  Half of the buckets (per direction when bidirectional) hold exact small
  distances; the rest grow logarithmically up to ``max_distance``, beyond
  which everything falls in the last bucket. Causal mode folds positive
  offsets (the future) into bucket 0.

  Args:
    relative_position: int array of ``key_position - query_position``.
    bidirectional: whether future keys get their own buckets.
    num_buckets: total number of buckets.
    max_distance: distance at which the buckets saturate.

  Returns:
    int32 array of the same shape, values in ``[0, num_buckets)``.
  """
  n = -np.asarray(relative_position, np.int64)
  bucket = np.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket += (n < 0).astype(np.int64) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  log_ratio = (np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps) /
               np.log(max_distance / max_exact))
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return (bucket + np.where(is_small, n, large)).astype(np.int32)


class RelativePositionBiases(nn.Module):
  """One table of per-head relative position biases (shared by a stack's layers).

  Attributes:
    num_buckets: number of relative position buckets.
    max_distance: distance at which buckets saturate.
    num_heads: attention heads.
    bidirectional: encoder (True) or causal decoder (False) bucketing.
    dtype: dtype of the returned bias.
    param_dtype: table storage dtype.
  """
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, q_len: int, k_len: int) -> Array:
    """Returns the ``[1, heads, q_len, k_len]`` bias for static lengths."""
    relative = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    buckets = relative_position_bucket(relative, self.bidirectional,
                                       self.num_buckets, self.max_distance)
    table = self.param('rel_embedding',
                       nn.with_logical_partitioning(relpos_init, ('heads', 'relpos_buckets')),
                       (self.num_heads, self.num_buckets), self.param_dtype)
    # [heads, q_len, k_len]
    bias = jnp.take(jnp.asarray(table, self.dtype), jnp.asarray(buckets), axis=1)
    return bias[None]


class MultiHeadDotProductAttention(nn.Module):
  """T5 multi-head attention: no biases, query scaling folded into its init.

  Attributes:
    num_heads: number of heads.
    head_dim: per-head width.
    dropout_rate: attention-weights dropout.
    dtype: activation dtype.
    param_dtype: parameter dtype.
    kernel_init: initializer of the projections (the query's is divided by
      ``sqrt(head_dim)``).
    decode: keep keys and values in a ``cache`` collection (self-attention
      of autoregressive decoding): ``init`` on the full decoding length sizes
      the cache, each later call writes its positions at the cache index and
      attends over the whole cache (the caller masks the unwritten slots).
    memory_cache: keep the keys and values projected from ``inputs_kv`` in
      the ``cache`` collection (cross-attention of autoregressive decoding,
      ``inputs_kv`` the encoder output): a call with ``inputs_kv`` projects
      and stores them, a call with ``inputs_kv=None`` reuses the stored ones.
    attention_impl: ``'einsum'`` (``dot_product_attention`` above, the
      reference) or ``'dot_product_attention'`` (``jax.nn``'s, cuDNN flash
      attention on GPU; no attention-weights dropout).

  Activations named for rematerialisation policies
  (``jax.ad_checkpoint.checkpoint_name``): ``query``, ``key``, ``value``
  (``[batch, length, heads, head_dim]``) and ``attention_out``
  (``[batch, q_len, emb]``).
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  kernel_init: Initializer = attention_kernel_init
  decode: bool = False
  memory_cache: bool = False
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array], mask: Optional[Array] = None,
               bias: Optional[Array] = None, deterministic: bool = True) -> Array:
    """Attends from ``inputs_q`` to ``inputs_kv``.

    Args:
      inputs_q: ``[batch, q_len, emb_dim]``.
      inputs_kv: ``[batch, k_len, emb_dim]``; None with ``memory_cache``
        reuses the cached keys and values.
      mask: bool, broadcastable to ``[batch, heads, q_len, k_len]``.
      bias: float, broadcastable to ``[batch, heads, q_len, k_len]``.
      deterministic: disables dropout.

    Returns:
      ``[batch, q_len, emb_dim]``.
    """
    def query_init(*args: Any) -> Array:
      return self.kernel_init(*args) / math.sqrt(self.head_dim)

    projection = functools.partial(
        DenseGeneral, features=(self.num_heads, self.head_dim),
        kernel_axes=('embed', 'joined_kv'), dtype=self.dtype, param_dtype=self.param_dtype)
    head_axes = ('batch', 'length', 'heads', 'kv')
    # [batch, length, heads, head_dim]
    query = checkpoint_name(nn.with_logical_constraint(
        projection(kernel_init=query_init, name='query')(inputs_q), head_axes), 'query')
    if self.memory_cache and inputs_kv is None:
      key = self.get_variable('cache', 'cached_key')
      value = self.get_variable('cache', 'cached_value')
      if key is None:
        raise ValueError('memory_cache attention called with inputs_kv=None before a call '
                         'with inputs_kv stored the keys and values')
    else:
      key = checkpoint_name(nn.with_logical_constraint(
          projection(kernel_init=self.kernel_init, name='key')(inputs_kv), head_axes), 'key')
      value = checkpoint_name(nn.with_logical_constraint(
          projection(kernel_init=self.kernel_init, name='value')(inputs_kv), head_axes), 'value')
      if self.decode:
        key, value = self._cached(key, value)
      elif self.memory_cache:
        self.put_variable('cache', 'cached_key', key)
        self.put_variable('cache', 'cached_value', value)

    if self.attention_impl == 'dot_product_attention':
      if not deterministic and self.dropout_rate > 0.0:
        raise ValueError("attention_impl='dot_product_attention' has no attention dropout; "
                         "use attention_impl='einsum' or dropout_rate=0")
      x = fused_dot_product_attention(query, key, value, bias, mask, self.dtype)
    elif self.attention_impl == 'einsum':
      total_bias = None if mask is None else mask_to_bias(mask)
      if bias is not None:
        total_bias = bias if total_bias is None else total_bias + bias
      dropout_rng = None
      if not deterministic and self.dropout_rate > 0.0:
        dropout_rng = self.make_rng('dropout')
      x = dot_product_attention(query, key, value, total_bias, dropout_rng=dropout_rng,
                                dropout_rate=self.dropout_rate, dtype=self.dtype)
    else:
      raise ValueError(f'attention_impl must be one of {ATTENTION_IMPLS}, '
                       f'got {self.attention_impl!r}')
    x = nn.with_logical_constraint(x, head_axes)
    out = DenseGeneral(features=inputs_q.shape[-1], axis=(-2, -1),
                       kernel_axes=('joined_kv', 'embed'), kernel_init=self.kernel_init,
                       dtype=self.dtype, param_dtype=self.param_dtype, name='out')(x)
    out = nn.with_logical_constraint(out, ('batch', 'length', 'embed'))
    return checkpoint_name(out, 'attention_out')


  def _cached(self, key: Array, value: Array) -> Tuple[Array, Array]:
    """Writes ``[batch, n, heads, head_dim]`` at the cache index; returns the full cache."""
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros, value.shape, value.dtype)
    index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
    if self.is_initializing():
      return key, value
    start = (0, index.value, 0, 0)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
    index.value = index.value + key.shape[1]
    return cached_key.value, cached_value.value


class MlpBlock(nn.Module):
  """Gated MLP: product of ``activations`` applied to parallel input projections.

  With ``('gelu', 'linear')`` this is T5.1.1's gated-GELU; the kernels are
  named ``wi_0, wi_1, ..`` (or ``wi`` for one activation) and ``wo``.

  Attributes:
    intermediate_dim: hidden width.
    activations: one activation name per input projection.
    intermediate_dropout_rate: dropout on the hidden activations.
    dtype: activation dtype.
    param_dtype: parameter dtype.

  The activation named for rematerialisation policies: ``mlp_hidden``
  (``[batch, length, mlp]``, after the gating).
  """
  intermediate_dim: int
  activations: Tuple[str, ...] = ('gelu', 'linear')
  intermediate_dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool = True) -> Array:
    """``[batch, length, emb_dim] -> [batch, length, emb_dim]``."""
    hidden = []
    for idx, name in enumerate(self.activations):
      dense_name = 'wi' if len(self.activations) == 1 else f'wi_{idx}'
      x = DenseGeneral(self.intermediate_dim, kernel_axes=('embed', 'mlp'), dtype=self.dtype,
                       param_dtype=self.param_dtype, name=dense_name)(inputs)
      hidden.append(_activation(name)(x))
    # [batch, length, mlp]
    x = checkpoint_name(functools.reduce(jnp.multiply, hidden), 'mlp_hidden')
    x = nn.Dropout(self.intermediate_dropout_rate, broadcast_dims=(-2,))(
        x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'mlp'))
    out = DenseGeneral(inputs.shape[-1], kernel_axes=('mlp', 'embed'), dtype=self.dtype,
                       param_dtype=self.param_dtype, name='wo')(x)
    return nn.with_logical_constraint(out, ('batch', 'length', 'embed'))
