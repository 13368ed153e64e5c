r"""Per-step cost of the agreed stop (``multihost.AgreedStop``) on two processes.

    python benchmarks/agreed_stop.py [--rounds 6] [--steps 10] [--config tiny]

Starts two processes joined by ``jax.distributed`` on 127.0.0.1 (one CPU
device each). Each trains span corruption on a synthetic global batch of 8
rows (inputs 64 / targets 16) and reads every step's loss, as the training
loop's logging does; rounds of ``--steps`` steps alternate between a plain
loop and one that also polls the agreed stop after each step. Process 0
prints one JSON object: the median step time of each and their difference.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
# pylint: disable=g-import-not-at-top
import jax
import numpy as np

import objective_step
from spactor_jax import multihost
from spactor_jax import runtime
from spactor_jax.objectives import span_corruption

BATCH, INPUTS, TARGETS = 8, 64, 16


def _worker(args) -> None:
  runtime.initialize()
  config = common.load_model_config(args.config)
  batch = objective_step.synthetic_batch(BATCH, INPUTS, TARGETS)
  objective = span_corruption.SpanCorruption(config=config, vocab=objective_step.VOCAB)
  trainer = common.make_trainer(objective, batch)
  half = BATCH // jax.process_count()
  rows = slice(jax.process_index() * half, (jax.process_index() + 1) * half)
  device_batch = {name: jax.make_array_from_process_local_data(trainer.data_sharding,
                                                               value[rows])
                  for name, value in batch.items()}
  state = trainer.init_state(jax.random.key(0))
  rng = jax.random.key(1)
  agreed = multihost.AgreedStop()
  times = {'plain': [], 'agreed_stop': []}
  for round_index in range(args.rounds + 1):  # round 0 compiles and warms up
    for mode in times:
      start = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = trainer.train_step(state, device_batch, rng)
        if mode == 'agreed_stop':
          assert not agreed.poll(False)
        float(metrics['loss'])
      if round_index:
        times[mode].append((time.perf_counter() - start) / args.steps)
  if jax.process_index() == 0:
    plain, polled = (statistics.median(times[m]) for m in ('plain', 'agreed_stop'))
    print(json.dumps({
        'benchmark': 'agreed_stop', 'processes': jax.process_count(),
        'devices': jax.device_count(), 'platform': jax.devices()[0].platform,
        'config': args.config, 'batch': BATCH, 'inputs': INPUTS, 'targets': TARGETS,
        'rounds': args.rounds, 'steps_per_round': args.steps,
        'plain_step_ms': round(plain * 1e3, 2), 'agreed_stop_step_ms': round(polled * 1e3, 2),
        'cost_ms_per_step': round((polled - plain) * 1e3, 2),
        'ratio': round(polled / plain, 3),
        'rounds_ms': {m: [round(t * 1e3, 2) for t in v] for m, v in times.items()}}))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--config', default='tiny')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(args)
    return
  port = _free_port()
  workers = []
  for index in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', SPACTOR_COORDINATOR=f'127.0.0.1:{port}',
               SPACTOR_NUM_PROCESSES='2', SPACTOR_PROCESS_ID=str(index),
               XLA_FLAGS='--xla_force_host_platform_device_count=1')
    workers.append(subprocess.Popen([sys.executable, __file__, '--worker', *sys.argv[1:]],
                                    env=env, stderr=subprocess.DEVNULL,
                                    stdout=None if index == 0 else subprocess.DEVNULL))
  try:
    statuses = [w.wait(timeout=1200) for w in workers]
  finally:
    for w in workers:
      w.kill()
  if statuses != [0, 0]:
    sys.exit(f'error: a worker exited {statuses}')


if __name__ == '__main__':
  main()
