"""Multi-process start-up: one place that calls ``jax.distributed.initialize``.

Call :func:`initialize` once, first thing in every entry point, before any
other JAX call touches a device. Where the process count, the process id and
the coordinator come from:

* **Explicit arguments** (gin: ``initialize.num_processes = 4`` ...) win.
* **Local launcher** (``launch/local_multiprocess.sh``) exports
  ``SPACTOR_COORDINATOR`` (``host:port``), ``SPACTOR_NUM_PROCESSES`` and
  ``SPACTOR_PROCESS_ID``.
* **SLURM** (``launch/gpu_slurm.sbatch``): ``SLURM_NTASKS``, ``SLURM_PROCID``
  and the first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``) as
  coordinator, on port ``SPACTOR_COORDINATOR_PORT`` or one derived from
  ``SLURM_JOB_ID`` (the same rule JAX uses).
* **Cluster auto-detection** with nothing of the above: JAX's own
  (``jax.distributed.initialize()`` without arguments) on a Cloud TPU VM or
  pod slice, a GKE TPU pod or under Open MPI's ``mpirun``. Every host runs
  the same command (``launch/tpu_pod.sh``).
* Otherwise the run is a single process and nothing is initialized. Where a
  scheduler says it started N > 1 processes (``SLURM_NTASKS``,
  ``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE``) but the runtime sees one, the run
  is refused: N copies would train into one ``MODEL_DIR``.

With several processes, :class:`spactor_jax.peer_watch.PeerWatch` ends every
process in one line when a peer goes silent (``peer_timeout_seconds``).
On CPU, cross-process collectives use gloo. Only the main process (index 0)
should write logs and summaries (:func:`is_main_process`); every process must
take part in checkpointing, which orbax coordinates itself.
"""

import glob
import itertools
import os
import re
from typing import List, Optional

import gin
import jax

from spactor_jax import peer_watch
from spactor_jax.errors import ConfigError

ENV_COORDINATOR = 'SPACTOR_COORDINATOR'
ENV_NUM_PROCESSES = 'SPACTOR_NUM_PROCESSES'
ENV_PROCESS_ID = 'SPACTOR_PROCESS_ID'
ENV_COORDINATOR_PORT = 'SPACTOR_COORDINATOR_PORT'

_PLATFORMS = ('cpu', 'gpu', 'tpu')
_GOOGLE_PCI_VENDOR_ID = '0x1ae0'
# PCI device ids of TPU chips v3 ... TPU7x (Google's gVNIC shares the vendor).
_TPU_PCI_DEVICE_IDS = ('0x0027', '0x0056', '0x005e', '0x0062', '0x0063',
                       '0x006f', '0x0076')
# Environment variables that Cloud TPU VM images (and GKE TPU pods) set.
_TPU_ENV_VARS = ('TPU_WORKER_HOSTNAMES', 'TPU_ACCELERATOR_TYPE',
                 'TPU_WORKER_ID', 'CLOUD_TPU_TASK_ID')


def expand_nodelist(nodelist: str) -> List[str]:
  """Expands a SLURM host list such as ``gpu[01-03,07],login1``.

  Handles comma-separated items, bracketed ranges with zero padding kept
  (``node[08-10]`` -> ``node08 node09 node10``), several bracket groups in one
  name (``rack[1-2]-n[1-2]``: every combination, the first group varying
  slowest) and hyphens inside host names.

  Args:
    nodelist: the value of ``SLURM_JOB_NODELIST`` or ``SLURM_STEP_NODELIST``.

  Returns:
    Host names in SLURM order.

  Raises:
    ConfigError: if the list is empty or its brackets are malformed.
  """
  hosts = []
  for item in _split_top_level(nodelist):
    parts = re.split(r'(\[[^\[\]]*\])', item)
    choices = []
    for part in parts:
      if part.startswith('['):
        choices.append(_expand_ranges(part[1:-1], nodelist))
      elif '[' in part or ']' in part:
        raise ConfigError(f'SLURM node list {nodelist!r} has unbalanced '
                          'brackets; expected e.g. "node[01-04],other".')
      else:
        choices.append([part])
    hosts.extend(''.join(c) for c in itertools.product(*choices))
  if not hosts:
    raise ConfigError(f'SLURM node list {nodelist!r} names no host.')
  return hosts


def _split_top_level(nodelist: str) -> List[str]:
  """Splits ``a[1,2],b`` at the commas outside brackets: ``['a[1,2]', 'b']``."""
  items, depth, current = [], 0, ''
  for ch in nodelist.strip():
    depth += {'[': 1, ']': -1}.get(ch, 0)
    if ch == ',' and depth == 0:
      items.append(current)
      current = ''
    else:
      current += ch
  items.append(current)
  return [item for item in items if item]


def _expand_ranges(spec: str, nodelist: str) -> List[str]:
  """Expands the inside of one bracket: ``'01-03,07'`` -> 01, 02, 03, 07."""
  values = []
  for piece in spec.split(','):
    match = re.fullmatch(r'(\d+)(?:-(\d+))?', piece)
    if not match:
      raise ConfigError(f'SLURM node list {nodelist!r}: cannot read range '
                        f'{piece!r}; expected "N" or "N-M".')
    first, last = match.group(1), match.group(2) or match.group(1)
    width = len(first)
    values.extend(f'{i:0{width}d}' for i in range(int(first), int(last) + 1))
  return values


def first_host(nodelist: str) -> str:
  """Returns the first host of a SLURM node list (the coordinator's host)."""
  return expand_nodelist(_split_top_level(nodelist)[0])[0]


def _int_env(name: str) -> Optional[int]:
  """Reads an integer environment variable; None when unset or empty."""
  value = os.environ.get(name, '')
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f'environment variable {name}={value!r} must be an '
                      'integer.') from None


def _slurm_coordinator() -> str:
  """The coordinator address ``first_host:port`` inside a SLURM job."""
  nodelist = (os.environ.get('SLURM_STEP_NODELIST') or
              os.environ.get('SLURM_JOB_NODELIST'))
  if not nodelist:
    raise ConfigError('SLURM_NTASKS is set but neither SLURM_STEP_NODELIST '
                      'nor SLURM_JOB_NODELIST is; run the command under srun.')
  port = _int_env(ENV_COORDINATOR_PORT)
  if port is None:
    job_id = _int_env('SLURM_JOB_ID') or 0
    port = job_id % 2**12 + (65535 - 2**12 + 1)  # JAX's SLURM default.
  return f'{first_host(nodelist)}:{port}'


def _slurm_local_device_ids(platform: str) -> Optional[List[int]]:
  """One GPU per process when SLURM starts several tasks on each node."""
  tasks = _int_env('SLURM_NTASKS')
  nodes = _int_env('SLURM_STEP_NUM_NODES') or _int_env('SLURM_JOB_NUM_NODES')
  local_id = _int_env('SLURM_LOCALID')
  if (platform == 'gpu' and tasks and nodes and local_id is not None and
      tasks > nodes):
    return [local_id]
  return None


def tpu_vm_detected() -> bool:
  """True on a Cloud TPU VM: TPU environment variables or TPU PCI devices."""
  if any(os.environ.get(name) for name in _TPU_ENV_VARS):
    return True
  for device_dir in glob.glob('/sys/bus/pci/devices/*'):
    try:
      with open(os.path.join(device_dir, 'vendor')) as f:
        vendor = f.read().strip()
      with open(os.path.join(device_dir, 'device')) as f:
        device = f.read().strip()
    except OSError:
      continue
    if vendor == _GOOGLE_PCI_VENDOR_ID and device in _TPU_PCI_DEVICE_IDS:
      return True
  return False


def _resolve_platform(platform: Optional[str]) -> str:
  """Explicit platform, else ``JAX_PLATFORMS``'s first entry, else detected."""
  if platform is None:
    from_env = os.environ.get('JAX_PLATFORMS', '').split(',')[0].strip()
    platform = from_env or ('tpu' if tpu_vm_detected() else None)
  if platform is None:
    return 'gpu' if glob.glob('/dev/nvidia[0-9]*') else 'cpu'
  platform = {'cuda': 'gpu', 'rocm': 'gpu'}.get(platform.lower(),
                                                 platform.lower())
  if platform not in _PLATFORMS:
    raise ConfigError(f'initialize.platform={platform!r} is not one of '
                      f'{", ".join(_PLATFORMS)}.')
  return platform


def _check(coordinator_address: Optional[str], num_processes: int,
           process_id: Optional[int]) -> None:
  """Raises ConfigError for inconsistent multi-process settings."""
  if num_processes < 1:
    raise ConfigError(f'num_processes={num_processes} must be at least 1.')
  if process_id is None and num_processes > 1:
    raise ConfigError(f'num_processes={num_processes} but no process id: set '
                      f'initialize.process_id or {ENV_PROCESS_ID} (under '
                      'SLURM, start the command with srun).')
  if process_id is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f'process_id={process_id} must be in [0, '
                      f'{num_processes}) for num_processes={num_processes}.')
  if num_processes == 1:
    return
  if not coordinator_address:
    raise ConfigError(f'num_processes={num_processes} but no coordinator: set '
                      f'initialize.coordinator_address or {ENV_COORDINATOR} '
                      'to "host:port".')
  if not re.fullmatch(r'[^\s:]+:\d+|\[[0-9a-fA-F:]+\]:\d+',
                      coordinator_address):
    raise ConfigError(f'coordinator_address={coordinator_address!r} must look '
                      'like "host:port".')


# Variables by which a cluster scheduler announces how many processes it started.
_PROCESS_COUNT_VARS = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'PMI_SIZE')

_watch: Optional[peer_watch.PeerWatch] = None


@gin.configurable
def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               platform: Optional[str] = None,
               peer_timeout_seconds: float = 60.0) -> None:
  """Starts JAX's distributed runtime when the run has several processes.

  Must run before anything creates a JAX backend (``jax.devices()``, an
  array, a jitted call). Calling it again after a successful start does
  nothing.

  Args:
    coordinator_address: ``host:port`` of process 0's coordination service.
      Default: ``SPACTOR_COORDINATOR``, else the first SLURM host, else what
      JAX's cluster detection finds.
    num_processes: total number of processes. Default:
      ``SPACTOR_NUM_PROCESSES``, else ``SLURM_NTASKS``, else JAX's cluster
      detection (Cloud TPU pods, GKE, Open MPI), else 1.
    process_id: this process's index in ``[0, num_processes)``. Default:
      ``SPACTOR_PROCESS_ID``, else ``SLURM_PROCID``, else detected.
    platform: ``'cpu'``, ``'gpu'`` or ``'tpu'``. Default: the first entry of
      ``JAX_PLATFORMS``, else detected from the machine. On CPU the
      cross-process collectives are set to gloo.
    peer_timeout_seconds: with several processes, a peer silent for this
      long (dead, killed, frozen, its host lost) ends every other process
      with one ``error:`` line and status 1 (:mod:`spactor_jax.peer_watch`).

  Raises:
    ConfigError: for inconsistent settings, e.g. ``process_id >=
      num_processes``, a missing coordinator, or a scheduler that started
      several processes which the runtime sees as one each.
  """
  if jax.distributed.is_initialized():
    return
  if not peer_timeout_seconds > 0:
    raise ConfigError(f'initialize.peer_timeout_seconds={peer_timeout_seconds!r} '
                      'must be a positive number of seconds, e.g. 60')
  platform = _resolve_platform(platform)
  in_slurm = _int_env('SLURM_NTASKS') is not None
  if num_processes is None:
    num_processes = _int_env(ENV_NUM_PROCESSES)
  if num_processes is None and in_slurm:
    num_processes = _int_env('SLURM_NTASKS')
  if process_id is None:
    process_id = _int_env(ENV_PROCESS_ID)
  if process_id is None and in_slurm:
    process_id = _int_env('SLURM_PROCID')
  if coordinator_address is None:
    coordinator_address = os.environ.get(ENV_COORDINATOR) or None
  if coordinator_address is None and in_slurm and (num_processes or 1) > 1:
    coordinator_address = _slurm_coordinator()
  timeouts = {'heartbeat_timeout_seconds':
              peer_watch.jax_heartbeat_seconds(peer_timeout_seconds)}

  if num_processes is None:
    if platform == 'tpu' or _detected_cluster() is not None:
      # Cloud TPU pods, GKE, Open MPI: JAX's own cluster detection knows.
      _gloo_on_cpu(platform)
      jax.distributed.initialize(**timeouts)
  else:
    _check(coordinator_address, num_processes, process_id)
    if num_processes > 1:
      _gloo_on_cpu(platform)
      jax.distributed.initialize(
          coordinator_address=coordinator_address,
          num_processes=num_processes,
          process_id=process_id,
          local_device_ids=(_slurm_local_device_ids(platform) if in_slurm
                            else None),
          cluster_detection_method='deactivate', **timeouts)
  _refuse_lone_copies()
  if jax.process_count() > 1:
    _start_watch(peer_timeout_seconds)


def _gloo_on_cpu(platform: str) -> None:
  """Cross-process collectives between CPU processes go through gloo."""
  if platform == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def _detected_cluster() -> Optional[str]:
  """The name of the cluster environment JAX's auto-detection would use."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if not env.opt_in_only_method and env.is_env_present():
      return env.name if hasattr(env, 'name') else env.__name__
  return None


def _refuse_lone_copies() -> None:
  """ConfigError when a scheduler started N > 1 processes the runtime sees as 1.

  Each of them would train its own copy of the model into one ``MODEL_DIR``.
  """
  if jax.process_count() > 1:
    return
  for name in _PROCESS_COUNT_VARS:
    claimed = _int_env(name)
    if claimed is not None and claimed > 1:
      raise ConfigError(
          f'{name}={claimed} says this job has {claimed} processes, but the JAX '
          'runtime sees this one alone (process 0 of 1): every process would '
          'train its own copy into one MODEL_DIR; start them with srun / '
          f'mpirun so that JAX detects the cluster, or set {ENV_COORDINATOR}, '
          f'{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}')


def _start_watch(timeout_seconds: float) -> None:
  global _watch
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  _watch = peer_watch.PeerWatch(
      distributed.global_state.client, jax.process_index(), jax.process_count(),
      timeout_seconds, is_running=lambda: distributed.global_state.client is not None)


def watch() -> Optional[peer_watch.PeerWatch]:
  """The running peer watch (None in a single-process run)."""
  return _watch


def is_main_process() -> bool:
  """True in the process that writes logs, summaries and config copies."""
  return jax.process_index() == 0


def process_info() -> str:
  """One line for logs, e.g. ``process 0/2, 4 local / 8 global cpu devices``."""
  return (f'process {jax.process_index()}/{jax.process_count()}, '
          f'{jax.local_device_count()} local / {jax.device_count()} global '
          f'{jax.default_backend()} devices')

