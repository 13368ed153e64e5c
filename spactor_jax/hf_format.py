"""Hugging Face ``transformers`` T5 names, configs and safetensors files.

This project's T5.1.1 (``network.EncoderDecoder`` / ``EncoderOnly``) has
exactly the arithmetic of ``transformers``' ``T5ForConditionalGeneration`` /
``T5EncoderModel`` (pre-norm RMS layers without bias, no 1/sqrt(d) in the
attention since T5 folds it into the query's initialisation, one relative
position table per stack, gated-GELU with tanh GELU): only names and kernel
layouts differ. A project kernel ``[in, out]`` (T5X's flattened
``DenseGeneral``) is the transpose of a ``torch.nn.Linear`` weight
``[out, in]``; the relative position table ``[heads, buckets]`` is the
transpose of HF's ``relative_attention_bias.weight`` ``[buckets, heads]``.

Files are written with ``safetensors.numpy`` and read by ``read_files``: no
torch needed.
"""

import json
from typing import Any, Dict, Iterator, List, Mapping, Tuple

from etils import epath
import ml_dtypes
import numpy as np
from safetensors import numpy as safetensors_numpy

from spactor_jax import errors
from spactor_jax import network

WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# Parameters with no place in the HF class (an RTD, CLS or copy-gate head, a
# generator), keyed by their project path (``rtd_head/dense/kernel``).
SIDE_FILE = 'spactor_params.safetensors'
CONFIG_FILE = 'config.json'

# TransformerConfig.mlp_activations -> T5Config.feed_forward_proj. flax's (the
# project's) 'gelu' is the tanh approximation: HF's 'gelu_new' ('gated-gelu'
# means gated 'gelu_new' too); HF's plain 'gelu' is the erf one.
FEED_FORWARD = {('gelu', 'linear'): 'gated-gelu', ('gelu',): 'gelu_new', ('relu',): 'relu',
                ('relu', 'linear'): 'gated-relu', ('silu', 'linear'): 'gated-silu'}
CLASSES = {'encoder_decoder': 'T5ForConditionalGeneration', 'encoder': 'T5EncoderModel'}
# HF copies of ``shared.weight`` that a checkpoint may hold (tied weights).
TIED_COPIES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')

_PROJECTIONS = {'query': 'q', 'key': 'k', 'value': 'v', 'out': 'o'}


def feed_forward_proj(config: network.TransformerConfig) -> str:
  """``T5Config.feed_forward_proj`` of the model's MLP.

  Raises:
    ConfigError: an MLP that no HF T5 computes.
  """
  try:
    return FEED_FORWARD[tuple(config.mlp_activations)]
  except KeyError:
    raise errors.ConfigError(
        f'TransformerConfig.mlp_activations = {config.mlp_activations} has no Hugging Face T5 '
        f'counterpart (those with one: {", ".join(map(str, FEED_FORWARD))})') from None


def _layer(stack: str, index: int, config: network.TransformerConfig
           ) -> Iterator[Tuple[str, str, bool]]:
  """``(project path, HF name, transposed)`` of one layer (paths below ``model``)."""
  ours, theirs = f'{stack}/layers_{index}', f'{stack}.block.{index}.layer'
  blocks = ([('pre_attention_layer_norm', 'attention', 'SelfAttention')] if stack == 'encoder'
            else [('pre_self_attention_layer_norm', 'self_attention', 'SelfAttention'),
                  ('pre_cross_attention_layer_norm', 'encoder_decoder_attention',
                   'EncDecAttention')])
  for sub, (norm, attention, hf_attention) in enumerate(blocks):
    yield f'{ours}/{norm}/scale', f'{theirs}.{sub}.layer_norm.weight', False
    for name, hf_name in _PROJECTIONS.items():
      yield (f'{ours}/{attention}/{name}/kernel',
             f'{theirs}.{sub}.{hf_attention}.{hf_name}.weight', True)
  sub = len(blocks)
  yield f'{ours}/pre_mlp_layer_norm/scale', f'{theirs}.{sub}.layer_norm.weight', False
  activations = config.mlp_activations
  inputs = ['wi'] if len(activations) == 1 else [f'wi_{i}' for i in range(len(activations))]
  for name in inputs + ['wo']:
    yield f'{ours}/mlp/{name}/kernel', f'{theirs}.{sub}.DenseReluDense.{name}.weight', True


def name_pairs(config: network.TransformerConfig, family: str) -> List[Tuple[str, str, bool]]:
  """Every ``(project path below model, HF name, transposed)`` of a T5.

  Args:
    config: the network.
    family: ``'encoder_decoder'`` (``T5ForConditionalGeneration``) or
      ``'encoder'`` (``T5EncoderModel``).
  """
  pairs = [('token_embedder/embedding', 'shared.weight', False),
           ('encoder/relpos_bias/rel_embedding',
            'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight', True),
           ('encoder/encoder_norm/scale', 'encoder.final_layer_norm.weight', False)]
  for i in range(config.num_encoder_layers):
    pairs.extend(_layer('encoder', i, config))
  if family == 'encoder':
    return pairs
  pairs += [('decoder/relpos_bias/rel_embedding',
             'decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight', True),
            ('decoder/decoder_norm/scale', 'decoder.final_layer_norm.weight', False)]
  for i in range(config.num_decoder_layers):
    pairs.extend(_layer('decoder', i, config))
  if not config.logits_via_embedding:
    pairs.append(('decoder/logits_dense/kernel', 'lm_head.weight', True))
  return pairs


def config_json(config: network.TransformerConfig, family: str) -> Dict[str, Any]:
  """The ``config.json`` of the HF class of ``family`` (see ``CLASSES``)."""
  decoder_layers = config.num_decoder_layers if family == 'encoder_decoder' else 0
  return {
      'architectures': [CLASSES[family]],
      'model_type': 't5',
      'vocab_size': config.vocab_size,
      'd_model': config.emb_dim,
      'd_kv': config.head_dim,
      'd_ff': config.mlp_dim,
      'num_heads': config.num_heads,
      'num_layers': config.num_encoder_layers,
      'num_decoder_layers': decoder_layers,
      'relative_attention_num_buckets': config.relative_attention_num_buckets,
      'relative_attention_max_distance': config.relative_attention_max_distance,
      'feed_forward_proj': feed_forward_proj(config),
      'tie_word_embeddings': bool(config.logits_via_embedding),
      'dropout_rate': config.dropout_rate,
      'layer_norm_epsilon': 1e-6,
      'initializer_factor': 1.0,
      'is_encoder_decoder': family == 'encoder_decoder',
      'use_cache': family == 'encoder_decoder',
      'pad_token_id': 0,
      'eos_token_id': 1,
      'decoder_start_token_id': 0,
      'dtype': 'float32',
  }


def check_config(held: Mapping[str, Any], config: network.TransformerConfig, where: str) -> None:
  """Refuses an HF ``config.json`` whose arithmetic the model's shapes cannot reveal.

  Raises:
    ConfigError: the MLP activation, relative-position distance or head
      split differs from ``config``.
  """
  asked = {'feed_forward_proj': feed_forward_proj(config),
           'relative_attention_max_distance': config.relative_attention_max_distance,
           'd_kv': config.head_dim}
  for key, value in asked.items():
    if key in held and held[key] != value:
      raise errors.ConfigError(
          f'{where} has {key} = {held[key]!r} but the gin configuration gives {value!r}; '
          'bind the TransformerConfig that matches the checkpoint')


def to_hf(params: Mapping[str, np.ndarray], config: network.TransformerConfig,
          family: str) -> Tuple[Dict[str, np.ndarray], List[str]]:
  """HF tensors of the T5 parameters (paths below ``model``).

  Returns:
    ``(tensors, unused)``: ``{HF name: float32 array}`` and the project paths
    that have no HF name (for the side file).
  """
  tensors, used = {}, set()
  for ours, theirs, transposed in name_pairs(config, family):
    value = np.asarray(params[ours], np.float32)
    tensors[theirs] = np.ascontiguousarray(value.T if transposed else value)
    used.add(ours)
  return tensors, sorted(set(params) - used)


def from_hf(tensors: Mapping[str, np.ndarray], held: Mapping[str, Any],
            config: network.TransformerConfig, family: str) -> Dict[str, np.ndarray]:
  """Project parameters (paths below ``model``) from HF tensors and ``config.json``.

  HF names the model does not have are kept as they are, so that
  ``param_loading.merge_params`` reports them as unused; tied copies of
  ``shared.weight`` are dropped. A ``transformers`` 5 T5 saved without
  ``lm_head.weight`` and with ``scale_decoder_outputs: false`` computes its
  logits with ``shared.weight`` unscaled: an untied project head equal to
  the embedding's transpose.
  """
  tensors = dict(tensors)
  if ('lm_head.weight' not in tensors and 'shared.weight' in tensors and family ==
      'encoder_decoder' and not config.logits_via_embedding
      and held.get('scale_decoder_outputs') is False):
    tensors['lm_head.weight'] = tensors['shared.weight']
  for copy in TIED_COPIES + (('lm_head.weight',) if config.logits_via_embedding else ()):
    if copy in tensors and 'shared.weight' in tensors and np.array_equal(
        tensors[copy], tensors['shared.weight']):
      del tensors[copy]
  params = {}
  for ours, theirs, transposed in name_pairs(config, family):
    if theirs in tensors:
      value = tensors.pop(theirs)
      params[ours] = value.T if transposed else value
  params.update(tensors)
  return params


def write(directory: epath.Path, tensors: Mapping[str, np.ndarray], name: str) -> None:
  """A safetensors file (``format: pt`` metadata, which ``transformers`` asks for)."""
  safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                              str(directory / name), metadata={'format': 'pt'})


def read(directory: epath.Path) -> Dict[str, np.ndarray]:
  """Every tensor of an HF model folder (one ``model.safetensors`` or an index of shards).

  Raises:
    ConfigError: no safetensors weights in the folder, or unreadable.
  """
  if (directory / INDEX_FILE).exists():
    files = sorted(set(json.loads((directory / INDEX_FILE).read_text())['weight_map'].values()))
  elif (directory / WEIGHTS_FILE).exists():
    files = [WEIGHTS_FILE]
  else:
    raise errors.ConfigError(
        f'{directory} has no {WEIGHTS_FILE} or {INDEX_FILE}; save the model with '
        'save_pretrained(..., safe_serialization=True)')
  return read_files(directory, files)


# safetensors dtype names; ``safetensors.numpy`` cannot load BF16 (NumPy has no
# bfloat16), so files are parsed here: an 8-byte little-endian header size, a
# JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
           'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32}


def _load(path: epath.Path) -> Dict[str, np.ndarray]:
  data = path.read_bytes()
  size = int.from_bytes(data[:8], 'little')
  header = json.loads(data[8:8 + size])
  header.pop('__metadata__', None)
  tensors = {}
  for name, info in header.items():
    start, end = info['data_offsets']
    tensors[name] = np.frombuffer(data, _DTYPES[info['dtype']], offset=8 + size + start,
                                  count=(end - start) // np.dtype(_DTYPES[info['dtype']]
                                                                  ).itemsize
                                  ).reshape(info['shape'])
  return tensors


def read_files(directory: epath.Path, files: List[str]) -> Dict[str, np.ndarray]:
  """The tensors of the named safetensors files of ``directory`` (F32, F16, BF16, ...).

  Raises:
    ConfigError: a file that is not safetensors or holds another dtype.
  """
  tensors = {}
  for file in files:
    try:
      tensors.update(_load(directory / file))
    except (OSError, ValueError, KeyError, TypeError) as exc:
      raise errors.ConfigError(
          f'{directory / file} is not a readable safetensors file of '
          f'{"/".join(_DTYPES)} tensors ({type(exc).__name__}: {errors.first_line(exc)})'
      ) from None
  return tensors
