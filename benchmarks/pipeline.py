r"""Input-pipeline throughput: plain span corruption vs the SpacTor features.

Runs both ``pdtext`` tasks through ``spactor_jax.data.pipeline.make_iterator``
(packed, encoder-decoder, one process) and prints one JSON object::

    python benchmarks/pipeline.py [--inputs_length 512 --targets_length 114]

Per task: ``rows_per_s`` (packed model rows), ``examples_per_s`` (task
examples packed into them, counted by segment ids), and ``tokens_per_s``
(non-padding encoder plus decoder tokens).
"""

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict

import numpy as np
import seqio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spactor_jax.data import pipeline  # pylint: disable=g-import-not-at-top

TASKS = ('pdtext_span_corruption', 'pdtext_spactor')


def measure(task: str, lengths: Dict[str, int], batch_size: int,
            seconds: float, warmup_batches: int) -> Dict[str, float]:
  """Times one task's iterator after a warm-up.

  Args:
    task: a registered encoder-decoder task.
    lengths: ``{'inputs': I, 'targets': T}``.
    batch_size: rows per batch.
    seconds: minimum measuring time.
    warmup_batches: batches read before the clock starts.

  Returns:
    Throughput figures of the task.
  """
  config = pipeline.DataConfig(task, lengths, seed=0)
  iterator = pipeline.make_iterator(config, 'encoder_decoder', batch_size,
                                    seqio.ShardInfo(0, 1))
  for _ in range(warmup_batches):
    next(iterator)
  batches = examples = tokens = 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    batch = next(iterator)
    batches += 1
    examples += int(batch['encoder_segment_ids'].max(axis=1).sum())
    tokens += int((batch['encoder_segment_ids'] > 0).sum() +
                  (batch['decoder_segment_ids'] > 0).sum())
  elapsed = time.perf_counter() - start
  return {
      'rows_per_s': round(batches * batch_size / elapsed, 1),
      'examples_per_s': round(examples / elapsed, 1),
      'tokens_per_s': round(tokens / elapsed, 1),
      'batches': batches,
      'seconds': round(elapsed, 2),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--inputs_length', type=int, default=512)
  parser.add_argument('--targets_length', type=int, default=114)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--seconds', type=float, default=20.0)
  parser.add_argument('--warmup_batches', type=int, default=5)
  args = parser.parse_args()
  lengths = {'inputs': args.inputs_length, 'targets': args.targets_length}
  results = {task: measure(task, lengths, args.batch_size, args.seconds,
                           args.warmup_batches) for task in TASKS}
  ratio = (results['pdtext_spactor']['tokens_per_s'] /
           results['pdtext_span_corruption']['tokens_per_s'])
  print(json.dumps({
      'benchmark': 'input_pipeline',
      'lengths': lengths,
      'packed': True,
      'batch_size': args.batch_size,
      'processes': 1,
      'cpus': os.cpu_count(),
      'machine': platform.machine(),
      'numpy': np.__version__,
      'results': results,
      'spactor_over_span_corruption_tokens_per_s': round(ratio, 3),
  }, indent=2))


if __name__ == '__main__':
  main()
