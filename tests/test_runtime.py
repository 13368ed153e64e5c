"""Tests for multi-process start-up, the launch scripts and TPU AOT helpers.

The multi-process tests start real Python processes that join through
``jax.distributed`` on 127.0.0.1 and run a collective across them.
"""

import os
import shlex
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import helpers
from spactor_jax import aot_topology
from spactor_jax import runtime
from spactor_jax.errors import ConfigError

LAUNCH = os.path.join(helpers.REPO, 'launch')

# Each process: 4 local CPU devices of 8; local data 1..4 and 5..8 summed
# across processes must give 36, by a jitted sum and by a psum in shard_map.
_DISTRIBUTED_CHECK = textwrap.dedent("""
    import numpy as np
    from spactor_jax import runtime
    runtime.initialize()
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert jax.process_count() == 2, jax.process_count()
    assert jax.device_count() == 8, jax.device_count()
    assert jax.local_device_count() == 4, jax.local_device_count()
    mesh = Mesh(np.array(jax.devices()), ('data',))
    local = np.arange(1, 5, dtype=np.float32) + 4 * jax.process_index()
    x = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P('data')), local)
    assert x.shape == (8,), x.shape
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    psum = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, 'data'),
                                 mesh=mesh, in_specs=P('data'),
                                 out_specs=P()))(x)
    assert float(total) == 36.0, float(total)
    assert np.asarray(psum.addressable_data(0)).tolist() == [36.0], psum
    print(f'ok sum={float(total)} main={runtime.is_main_process()} '
          f'{runtime.process_info()}', flush=True)
    """)


def _child_env(**extra: str) -> dict:
  """Environment for a child process: CPU, 4 devices, no inherited cluster."""
  return helpers.subprocess_env(4, **extra)


def _communicate_all(procs, timeout: float):
  """Waits for every process; kills all of them if one hangs."""
  outputs = []
  deadline = time.monotonic() + timeout
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
      outputs.append(out)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return outputs


# ---- SLURM node lists ------------------------------------------------------


@pytest.mark.parametrize('nodelist, expected', [
    ('node01', ['node01']),
    ('node[01-04]', ['node01', 'node02', 'node03', 'node04']),
    ('gpu[08-10],login1', ['gpu08', 'gpu09', 'gpu10', 'login1']),
    ('a-b-[1-2,5]', ['a-b-1', 'a-b-2', 'a-b-5']),
    ('dgx[001,003-004],cpu7', ['dgx001', 'dgx003', 'dgx004', 'cpu7']),
    ('rack[1-2]-n[1-2]', ['rack1-n1', 'rack1-n2', 'rack2-n1', 'rack2-n2']),
    ('host9,host10', ['host9', 'host10']),
])
def test_expand_nodelist(nodelist, expected):
  assert runtime.expand_nodelist(nodelist) == expected


@pytest.mark.parametrize('nodelist, expected', [
    ('node[07-12],other', 'node07'),
    ('login3,node[01-02]', 'login3'),
    ('gpu-a100-[0003-0010]', 'gpu-a100-0003'),
])
def test_first_host(nodelist, expected):
  assert runtime.first_host(nodelist) == expected


@pytest.mark.parametrize('nodelist', ['node[01-04', 'node01-04]', 'node[a-b]',
                                      '', 'n[1-]'])
def test_malformed_nodelist(nodelist):
  with pytest.raises(ConfigError):
    runtime.expand_nodelist(nodelist)


# ---- Inconsistent settings ---------------------------------------------------


@pytest.mark.parametrize('kwargs, env, message', [
    (dict(num_processes=2, process_id=2, coordinator_address='127.0.0.1:1'),
     {}, r'process_id=2 must be in \[0, 2\)'),
    (dict(num_processes=2, process_id=0), {}, 'no coordinator'),
    (dict(num_processes=2, process_id=0, coordinator_address='localhost'),
     {}, 'host:port'),
    (dict(platform='metal'), {}, 'platform'),
    ({}, {'SPACTOR_NUM_PROCESSES': '2', 'SPACTOR_PROCESS_ID': '5',
          'SPACTOR_COORDINATOR': '127.0.0.1:1'}, 'process_id=5'),
    ({}, {'SPACTOR_NUM_PROCESSES': 'two'}, 'SPACTOR_NUM_PROCESSES'),
    ({}, {'SLURM_NTASKS': '4', 'SLURM_PROCID': '1'}, 'SLURM_STEP_NODELIST'),
    ({}, {'SLURM_NTASKS': '4', 'SLURM_PROCID': '4',
          'SLURM_JOB_NODELIST': 'n[1-4]'}, 'process_id=4'),
])
def test_inconsistent_settings_raise_config_error(kwargs, env, message,
                                                  monkeypatch):
  for name in list(os.environ):
    if name.startswith(('SLURM_', 'SPACTOR_')):
      monkeypatch.delenv(name)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ConfigError, match=message):
    runtime.initialize(**kwargs)


# ---- Real multi-process runs -----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize('convention', ['spactor', 'slurm'])
def test_two_processes_share_a_global_array(convention):
  port = helpers.free_port()
  procs = []
  for rank in range(2):
    if convention == 'spactor':  # What launch/local_multiprocess.sh exports.
      env = _child_env(SPACTOR_COORDINATOR=f'127.0.0.1:{port}',
                       SPACTOR_NUM_PROCESSES='2', SPACTOR_PROCESS_ID=str(rank))
    else:  # What srun sets, with the coordinator on the first listed host.
      env = _child_env(SLURM_NTASKS='2', SLURM_PROCID=str(rank),
                       SLURM_LOCALID=str(rank), SLURM_JOB_ID='123',
                       SLURM_STEP_NODELIST='localhost,nodeb',
                       SPACTOR_COORDINATOR_PORT=str(port))
    procs.append(subprocess.Popen(
        [sys.executable, '-c', _DISTRIBUTED_CHECK], env=env, cwd=helpers.REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = _communicate_all(procs, timeout=60)
  for rank, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, out
    assert (f'ok sum=36.0 main={rank == 0} process {rank}/2, 4 local / 8 '
            'global cpu devices') in out, out


@pytest.mark.slow
def test_local_launcher_runs_processes_with_prefixed_logs(tmp_path):
  (tmp_path / 'distributed_check.py').write_text(_DISTRIBUTED_CHECK)
  env = _child_env(PYTHON=sys.executable,
                   PYTHONPATH=os.pathsep.join([str(tmp_path), helpers.REPO]))
  env.pop('XLA_FLAGS')
  result = subprocess.run(
      [os.path.join(LAUNCH, 'local_multiprocess.sh'), '-n', '2', '-d', '4',
       '-m', 'distributed_check', str(tmp_path / 'run'), 'unused.gin'],
      env=env, cwd=helpers.REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  assert '[p0] ok sum=36.0 main=True process 0/2' in result.stdout
  assert '[p1] ok sum=36.0 main=False process 1/2' in result.stdout


@pytest.mark.slow
def test_local_launcher_propagates_failure_and_stops_the_rest(tmp_path):
  (tmp_path / 'fake_train.py').write_text(textwrap.dedent("""
      import os, sys, time
      rank = int(os.environ['SPACTOR_PROCESS_ID'])
      print('rank', rank, 'of', os.environ['SPACTOR_NUM_PROCESSES'],
            'at', os.environ['SPACTOR_COORDINATOR'], 'args', sys.argv[1:],
            flush=True)
      if rank == 1:
        time.sleep(0.5)
        sys.exit(3)
      time.sleep(120)
      """))
  env = _child_env(PYTHON=sys.executable, PYTHONPATH=str(tmp_path))
  start = time.monotonic()
  result = subprocess.run(
      [os.path.join(LAUNCH, 'local_multiprocess.sh'), '-n', '3', '-m',
       'fake_train', '/tmp/model dir', 'a.gin,b.gin', '--gin.STEPS=5'],
      env=env, cwd=helpers.REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 3, result.stdout + result.stderr
  assert time.monotonic() - start < 30  # rank 0 (sleeping 120 s) was killed
  expected_args = ("args ['--gin_file=a.gin', '--gin_file=b.gin', "
                   "\"--gin.MODEL_DIR='/tmp/model dir'\", '--gin.STEPS=5']")
  for rank in range(3):
    assert f'[p{rank}] rank {rank} of 3 at 127.0.0.1:' in result.stdout
  assert expected_args in result.stdout
  assert 'process 1 ' in result.stderr and 'exit status 3' in result.stderr


@pytest.mark.parametrize('script', ['local_multiprocess.sh', 'tpu_pod.sh',
                                    'gpu_slurm.sbatch'])
def test_launch_scripts_print_usage(script):
  result = subprocess.run([os.path.join(LAUNCH, script), '-h'],
                          capture_output=True, text=True, timeout=10)
  assert result.returncode == 0, result.stderr
  assert 'Usage:' in result.stdout and 'MODEL_DIR' in result.stdout


def test_tpu_pod_script_sends_one_quoted_command_to_all_workers():
  result = subprocess.run(
      [os.path.join(LAUNCH, 'tpu_pod.sh'), '-n', '-t', 'my-v4', '-z',
       'us-central2-b', '-r', '/opt/spactor', 'gs://bucket/run',
       'models/base.gin,runs/pretrain.gin', "--gin.NAME='a b'"],
      capture_output=True, text=True, timeout=10)
  assert result.returncode == 0, result.stderr
  gcloud = shlex.split(result.stdout.splitlines()[-1])
  assert gcloud[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-v4']
  assert '--worker=all' in gcloud and '--zone=us-central2-b' in gcloud
  remote = next(a for a in gcloud if a.startswith('--command='))
  remote_argv = shlex.split(remote[len('--command='):])
  assert remote_argv == [
      'cd', '/opt/spactor', '&&', 'python3', '-m', 'spactor_jax.train',
      '--gin_file=models/base.gin', '--gin_file=runs/pretrain.gin',
      "--gin.MODEL_DIR='gs://bucket/run'", "--gin.NAME='a b'"]


# ---- AOT compilation for TPU topologies --------------------------------------


@pytest.mark.parametrize('topology, mesh_shape, message', [
    ('v7x:2x2', {'data': 4}, 'unknown TPU topology'),
    ('v5e-16', {'data': 16}, 'unknown TPU topology'),
    ('v4:4x4', {'data': 16}, '3-D chip grid'),
    ('v5e:2x2x2', {'data': 8}, '2-D chip grid'),
    ('v5e:2x2', {'data': 2, 'model': 4}, 'has 4 chips'),
    ('v4:4x4x4', {'data': 128}, 'has 64 chips'),
])
def test_topology_mesh_rejects_bad_settings(topology, mesh_shape, message):
  with pytest.raises(ConfigError, match=message):
    aot_topology.topology_mesh(topology, mesh_shape)


def test_compile_report_on_cpu_counts_bytes_and_flops():
  m, k, n = 64, 128, 32
  compiled = jax.jit(jnp.matmul).lower(
      jax.ShapeDtypeStruct((m, k), jnp.float32),
      jax.ShapeDtypeStruct((k, n), jnp.float32)).compile()
  report = aot_topology.compile_report(compiled, hbm_bytes_per_chip=1 << 30)
  assert report['argument_bytes'] == (m * k + k * n) * 4
  assert report['output_bytes'] == m * n * 4
  assert report['flops'] == 2 * m * k * n
  assert report['fits']
  assert not aot_topology.compile_report(compiled, 1024)['fits']


def test_compile_sharded_matmul_for_v5e_2x2():
  pytest.importorskip(
      'libtpu', reason='libtpu not installed (pip install "jax[tpu]"); TPU '
      'AOT compilation cannot be tested')
  mesh = aot_topology.topology_mesh('v5e:2x2', {'data': 2, 'model': 2})
  assert mesh.devices.shape == (2, 2)
  assert mesh.devices.flat[0].device_kind == 'TPU v5 lite'
  m, k, n = 1024, 2048, 4096
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P('data', None)))
  w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P(None, 'model')))
  compiled = jax.jit(
      jnp.matmul,
      out_shardings=NamedSharding(mesh, P('data', 'model'))).lower(
          x, w).compile()
  report = aot_topology.compile_report(compiled, aot_topology.HBM_BYTES['v5e'])
  assert set(report) == {
      'argument_bytes', 'output_bytes', 'temp_bytes', 'alias_bytes',
      'generated_code_bytes', 'peak_bytes', 'total_bytes', 'hbm_bytes',
      'fits', 'flops'}
  assert report['flops'] > 0
  assert report['flops'] == pytest.approx(2 * m * k * n / 4, rel=0.01)
  assert report['argument_bytes'] == (m * k // 2 + k * n // 2) * 2
  assert report['output_bytes'] == m * n * 2 // 4
  assert report['fits'] and report['total_bytes'] > 0
