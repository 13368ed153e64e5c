r"""Compile time of the training gradient against depth, with and without scanned layers.

    python benchmarks/compile_time.py [--depths 2 12 24] [--config tiny]

For each depth ``n`` (``n`` encoder and ``n`` decoder layers of the widths in
``gin_configs/models/<config>.gin``) and each layout (``scan_layers`` False:
a Python loop of ``n`` layer copies; True: one ``nn.scan`` body), the
gradient of a span-corruption-shaped loss (inputs 512 / targets 114, batch
2) is traced, lowered and compiled by XLA for the default device. Prints one
JSON object: per layout and depth the seconds to trace and lower
(``lower_s``) and to compile (``compile_s``), and XLA's FLOP count of the
program. The model is not run. XLA counts a loop body once: the scanned
count is that of one layer per stack whatever the depth, the unscanned count
is the real one.
"""

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict

import jax
import jax.numpy as jnp

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
# pylint: disable=g-import-not-at-top
from spactor_jax import losses
from spactor_jax import network


def measure(config: network.TransformerConfig, inputs: int, targets: int,
            batch_size: int) -> Dict[str, float]:
  """Seconds to lower and compile ``grad(loss)`` of one network."""
  model = network.EncoderDecoder(config)
  enc = jax.ShapeDtypeStruct((batch_size, inputs), jnp.int32)
  dec = jax.ShapeDtypeStruct((batch_size, targets), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones(enc.shape, jnp.int32),
                                             jnp.ones(dec.shape, jnp.int32))['params'])

  def loss(p, enc_tokens, dec_tokens):
    logits = model.apply({'params': p}, enc_tokens, dec_tokens)
    return losses.cross_entropy_with_z_loss(logits, dec_tokens, jnp.ones(dec_tokens.shape))[0]

  start = time.perf_counter()
  lowered = jax.jit(jax.grad(loss)).lower(params, enc, dec)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  return {'lower_s': round(lowered_at - start, 2), 'compile_s': round(done - lowered_at, 2),
          'flops': common.xla_flops(compiled)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--depths', nargs='+', type=int, default=[2, 12, 24])
  parser.add_argument('--config', default='tiny', help='gin_configs/models/<config>.gin widths')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--inputs_length', type=int, default=512)
  parser.add_argument('--targets_length', type=int, default=114)
  parser.add_argument('--batch_size', type=int, default=2)
  args = parser.parse_args()
  base_config = common.load_model_config(args.config, args.dtype)
  result: Dict[str, object] = {
      'device': f'{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, '
                f'{os.cpu_count()} cores)',
      'config': args.config, 'dtype': args.dtype, 'batch_size': args.batch_size,
      'inputs_length': args.inputs_length, 'targets_length': args.targets_length,
  }
  for scan in (False, True):
    layout = 'scanned' if scan else 'unscanned'
    result[layout] = {}
    for depth in args.depths:
      config = base_config.replace(num_encoder_layers=depth, num_decoder_layers=depth,
                                   scan_layers=scan)
      result[layout][depth] = measure(config, args.inputs_length, args.targets_length,
                                      args.batch_size)
      print(json.dumps({layout: {depth: result[layout][depth]}}), flush=True,
            file=sys.stderr)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
