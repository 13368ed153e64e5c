r"""Greedy encoder-decoder decoding: the KV cache against re-running the decoder.

    python benchmarks/decoding.py [--model small --batch 8 --inputs 128 --targets 64 --repeats 3]

Both decoders take the same random T5.1.1 parameters (``gin_configs/models/<model>.gin``,
float32) and random inputs, and decode all ``--targets`` positions (no EOS):

* ``cached`` — ``decoding.greedy_decode``: the encoder and the cross-attention
  keys/values once, then one position per step through the self-attention cache;
* ``uncached`` — the encoder once, then the whole decoder on the fixed-length
  target prefix at every step (what span filling did before the cache).

Prints one JSON object: median seconds per call (after a compile call), tokens/s
(batch x targets / seconds), ``speedup`` (uncached / cached) and whether both
chose the same tokens.
"""

import argparse
import functools
import json
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
# pylint: disable=g-import-not-at-top
from spactor_jax import decoding
from spactor_jax import network


@functools.partial(jax.jit, static_argnames=('model', 'max_length'))
def uncached_greedy(model: network.EncoderDecoder, params, inputs: jax.Array,
                    max_length: int) -> jax.Array:
  """``[batch, max_length]`` greedy targets, the decoder re-run on the whole prefix per step."""
  batch = inputs.shape[0]
  encoded = model.apply({'params': params}, inputs, method=lambda m, x: m.encode(x))

  def step(targets, position):
    decoder_inputs = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), targets[:, :-1]], axis=1)
    logits = model.apply({'params': params}, encoded, inputs, decoder_inputs,
                         method=lambda m, e, i, d: m.decode(e, i, d))
    chosen = jnp.argmax(logits[:, position], axis=-1).astype(jnp.int32)
    return targets.at[:, position].set(chosen), None

  targets, _ = jax.lax.scan(step, jnp.zeros((batch, max_length), jnp.int32),
                            jnp.arange(max_length))
  return targets


def _median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='small')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--inputs', type=int, default=128)
  parser.add_argument('--targets', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  config = common.load_model_config(args.model)
  model = network.EncoderDecoder(config)
  inputs = jnp.asarray(np.random.RandomState(0).randint(
      2, config.vocab_size, (args.batch, args.inputs)), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), inputs[:1],
                                        jnp.zeros((1, args.targets), jnp.int32))['params'])
  cached = lambda: decoding.greedy_decode(model, params, inputs, args.targets, eos_id=-1)
  uncached = lambda: uncached_greedy(model, params, inputs, args.targets)
  seconds = {'cached': _median_seconds(cached, args.repeats),
             'uncached': _median_seconds(uncached, args.repeats)}
  tokens = args.batch * args.targets
  print(json.dumps({
      'benchmark': 'greedy_decoding', 'model': args.model, 'batch': args.batch,
      'input_length': args.inputs, 'target_length': args.targets,
      'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
      'machine': platform.machine(),
      **{f'{name}_s': round(s, 4) for name, s in seconds.items()},
      **{f'{name}_tokens_per_s': round(tokens / s, 1) for name, s in seconds.items()},
      'speedup': round(seconds['uncached'] / seconds['cached'], 2),
      'same_tokens': bool(np.array_equal(cached(), uncached())),
  }))


if __name__ == '__main__':
  main()
