"""Autoregressive decoding: KV-cached sampling for decoder-only models, span filling for T5.

Decoder-only (``network.DecoderOnly``): the model reads ``[0] + prompt`` one
position per step through its KV cache (``decode_length`` slots; prompts of
different lengths share the steps, a row's prompt tokens are forced until it
is exhausted) and then its own choices (``choose``). Rows stop at EOS; later
positions are padding (0).

Encoder-decoder (``network.EncoderDecoder``): ``decode_targets`` runs the
encoder once, projects its output to the cross-attention keys and values of
every decoder layer once, and then decodes one position per step through the
decoder's self-attention KV cache (T5's relative position bias of the step's
query row), choosing the same way; ``fill_spans`` puts predicted spans back
in place of the input's sentinels.

Choosing: the network's logits times ``logit_scale`` (the factor the objective
applied in training, e.g. ``LMTuning.logit_scale``; 1 for the others) are the
model's logits. ``temperature = 0`` takes their argmax; otherwise a sample of
``softmax(logits / temperature)`` restricted to the ``top_k`` most likely ids
and to the fewest most likely ids whose probability reaches ``top_p``.
"""

import functools
import re
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from spactor_jax import network

Array = jax.Array
Params = Any


def init_cache(model: Any, batch_size: int, input_length: Optional[int] = None
               ) -> Dict[str, Any]:
  """A zero ``cache`` collection for ``model.decode_length`` positions (no parameters made).

  Args:
    model: a ``DecoderOnly`` or an ``EncoderDecoder`` with ``decode_length`` set.
    batch_size: rows decoded together.
    input_length: encoder input length (``EncoderDecoder`` only).
  """
  tokens = jnp.zeros((batch_size, model.decode_length), jnp.int32)
  if isinstance(model, network.EncoderDecoder):
    args = (jnp.zeros((batch_size, input_length), jnp.int32), tokens)
  else:
    args = (tokens,)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))['cache']
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _step_logits(model: network.DecoderOnly, params: Params, cache: Any,
                 tokens: Array) -> Tuple[Array, Any]:
  """``tokens [batch]`` at the cache position → ``([batch, vocab] logits, cache)``."""
  logits, variables = model.apply(
      {'params': params, 'cache': cache}, tokens[:, None],
      method=lambda m, t: m.logits(m(t)), mutable=['cache'])
  return logits[:, 0], variables['cache']


def _encdec_step_logits(model: network.EncoderDecoder, params: Params, cache: Any,
                        inputs: Array, encoded: Optional[Array], tokens: Array
                        ) -> Tuple[Array, Any]:
  """One cached decoder step of an encoder-decoder.

  Args:
    model: an ``EncoderDecoder`` with ``decode_length`` set.
    params: its parameters.
    cache: the ``cache`` collection (``init_cache``).
    inputs: ``[batch, in_len]`` encoder input ids (the cross-attention mask).
    encoded: ``[batch, in_len, emb]`` encoder output on the first step, which
      stores its cross-attention keys and values in the cache; None on later
      steps, which reuse them.
    tokens: ``[batch]`` decoder input ids at the cache position.

  Returns:
    ``([batch, vocab]`` float32 logits, the updated cache).
  """
  logits, variables = model.apply(
      {'params': params, 'cache': cache}, encoded, inputs, tokens[:, None],
      method=lambda m, e, i, t: m.decode(e, i, t), mutable=['cache'])
  return logits[:, 0], variables['cache']


def choose(logits: Array, rng: Array, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> Array:
  """Next ids ``[batch]`` from ``[batch, vocab]`` logits (already scaled).

  ``temperature == 0`` is greedy (argmax); otherwise a sample of
  ``softmax(logits / temperature)`` over the ``top_k`` largest logits
  (``top_k == 0``: all ids) and, of those, the fewest most likely whose
  probabilities sum to at least ``top_p`` (nucleus sampling; 1: all).
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probabilities = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probabilities, axis=-1) - probabilities  # mass of the likelier ids
    smallest_kept = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < smallest_kept, -jnp.inf, logits)
  return jax.random.categorical(rng, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'temperature', 'top_k', 'top_p',
                                             'logit_scale', 'eos_id'))
def generate(model: network.DecoderOnly, params: Params, prompts: Array, prompt_lengths: Array,
             rng: Array, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             logit_scale: float = 1.0, eos_id: int = 1) -> Array:
  """Continues each prompt up to ``model.decode_length`` tokens.

  Args:
    model: a ``DecoderOnly`` with ``decode_length`` set (the total length).
    params: its parameters (with the vocabulary head).
    prompts: ``[batch, decode_length]`` ids, each row's prompt first, then 0s.
    prompt_lengths: ``[batch]`` prompt lengths (0: start from BOS alone).
    rng: sampling key (unused when greedy).
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_k: sample among this many most likely ids (0: all).
    top_p: sample among the fewest most likely ids holding this probability (1: all).
    logit_scale: the factor training applied to the head's logits.
    eos_id: a row stops after emitting it.

  Returns:
    ``[batch, decode_length]``: the prompt followed by the continuation, up
    to and including EOS, 0 after.
  """
  batch, length = prompts.shape
  cache = init_cache(model, batch)

  def step(carry, position):
    cache, previous, done, rng = carry
    rng, key = jax.random.split(rng)
    logits, cache = _step_logits(model, params, cache, previous)
    chosen = choose(logits * logit_scale, key, temperature, top_k, top_p)
    forced = position < prompt_lengths
    token = jnp.where(forced, prompts[:, position], jnp.where(done, 0, chosen))
    done = done | (~forced & (token == eos_id))
    return (cache, token, done, rng), token

  bos = jnp.zeros((batch,), jnp.int32)
  init = (cache, bos, jnp.zeros((batch,), jnp.bool_), rng)
  _, tokens = jax.lax.scan(step, init, jnp.arange(length))
  return tokens.T  # [batch, length]


@functools.partial(jax.jit, static_argnames=('model', 'max_length', 'temperature', 'top_k',
                                             'top_p', 'logit_scale', 'eos_id'))
def decode_targets(model: network.EncoderDecoder, params: Params, inputs: Array,
                   max_length: int, rng: Array, *, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, logit_scale: float = 1.0, eos_id: int = 1) -> Array:
  """Encoder-decoder targets, KV-cached: greedy or sampled (``choose``).

  The encoder runs once and each decoder layer projects its output to
  cross-attention keys and values once; then one position per step through
  the self-attention cache, starting from BOS (0), until every row has
  emitted ``eos_id`` or ``max_length`` positions are written.

  Args:
    model: an ``EncoderDecoder`` (any ``decode_length``; scanned layers or not,
      matching ``params``).
    params: its parameters.
    inputs: ``[batch, in_len]`` int32 encoder input ids (0 = padding).
    max_length: decoded positions.
    rng: sampling key (unused when greedy).
    temperature, top_k, top_p, logit_scale: as in ``generate``.
    eos_id: a row stops after emitting it.

  Returns:
    ``[batch, max_length]`` int32 ids up to and including EOS, 0 after.
  """
  model = model.clone(decode_length=max_length)
  batch, input_length = inputs.shape
  pick = lambda logits, key: choose(logits * logit_scale, key, temperature, top_k, top_p)
  encoded = model.apply({'params': params}, inputs, method=lambda m, x: m.encode(x))
  cache = init_cache(model, batch, input_length)
  logits, cache = _encdec_step_logits(model, params, cache, inputs, encoded,
                                      jnp.zeros((batch,), jnp.int32))
  rng, key = jax.random.split(rng)
  first = pick(logits, key)
  targets = jnp.zeros((batch, max_length), jnp.int32).at[:, 0].set(first)

  def not_finished(carry):
    _, _, position, _, done, _ = carry
    return (position < max_length) & ~jnp.all(done)

  def step(carry):
    cache, targets, position, previous, done, rng = carry
    rng, key = jax.random.split(rng)
    logits, cache = _encdec_step_logits(model, params, cache, inputs, None, previous)
    token = jnp.where(done, 0, pick(logits, key))
    targets = jax.lax.dynamic_update_slice_in_dim(targets, token[:, None], position, axis=1)
    return cache, targets, position + 1, token, done | (token == eos_id), rng

  init = (cache, targets, jnp.ones((), jnp.int32), first, first == eos_id, rng)
  return jax.lax.while_loop(not_finished, step, init)[1]


def greedy_decode(model: network.EncoderDecoder, params: Params, inputs: Array,
                  max_length: int, eos_id: int = 1) -> Array:
  """Greedy ``decode_targets`` (argmax at every position)."""
  return decode_targets(model, params, inputs, max_length, jax.random.key(0), eos_id=eos_id)


_SENTINEL = re.compile(r'<extra_id_(\d+)>')


def spans_from_ids(targets: np.ndarray, vocab: Any) -> Dict[int, List[int]]:
  """Decoder ids ``<extra_id_0> a b <extra_id_1> c EOS`` → ``{0: [a, b], 1: [c]}``.

  Args:
    targets: ``[length]`` ids; reading stops at EOS or padding.
    vocab: a ``base.VocabInfo`` (``<extra_id_k>`` is id ``vocab_size - 1 - k``).
  """
  spans: Dict[int, List[int]] = {}
  current = None
  for token in (int(t) for t in targets):
    if token in (vocab.pad_id, vocab.eos_id):
      break
    if vocab.first_sentinel_id <= token < vocab.vocab_size:
      current = vocab.vocab_size - 1 - token
      spans[current] = []
    elif current is not None:
      spans[current].append(token)
  return spans


def fill_spans(text: str, spans: Dict[int, str]) -> str:
  """Replaces each ``<extra_id_k>`` of ``text`` by ``spans[k]`` (``''`` when missing)."""
  return _SENTINEL.sub(lambda m: spans.get(int(m.group(1)), ''), text)


def pad_prompts(prompts: List[List[int]], length: int) -> Tuple[np.ndarray, np.ndarray]:
  """Ragged id lists → ``([batch, length]`` right-padded ids, ``[batch]`` lengths)."""
  ids = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt) >= length:
      raise ValueError(f'prompt {row} has {len(prompt)} tokens; the decode length is {length}')
    ids[row, :len(prompt)] = prompt
  return ids, np.array([len(p) for p in prompts], np.int32)


def generated_part(tokens: np.ndarray, prompt_length: int, eos_id: int = 1,
                   ) -> List[int]:
  """The ids after the prompt, up to (not including) EOS or padding."""
  out = []
  for token in tokens[prompt_length:]:
    if token in (0, eos_id):
      break
    out.append(int(token))
  return out


def encode_inputs(texts: List[str], encode: Any, length: int, eos_id: int = 1,
                  ) -> np.ndarray:
  """Encoder inputs ``[batch, length]``: each text's ids and EOS, 0-padded."""
  rows = np.zeros((len(texts), length), np.int32)
  for row, text in enumerate(texts):
    ids = list(encode(text))[:length - 1] + [eos_id]
    rows[row, :len(ids)] = ids
  return rows

