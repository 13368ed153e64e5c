"""Test setup: eight fake CPU devices for mesh tests, quiet TensorFlow, libtpu
and a compilation cache shared between test processes."""

import os
import shutil
import tempfile

# The tests' programs are tiny and compiled far more often than they run long: XLA:CPU
# compiles them without LLVM's costly optimisation passes (the same HLO passes and IEEE
# arithmetic, so the same numbers): 13-35% less CPU time in the tests measured.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Both xdist workers (and the AOT subprocesses) load libtpu for compile-only
# TPU topologies; without this the second one finds /tmp/libtpu_lockfile held.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import gin  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top


def pytest_configure(config):
  # Many tests start processes that compile the same tiny programs: the xdist
  # workers and every child they start share one persistent compilation cache
  # (keyed by the program and its compile options, so a hit is the executable a
  # compile gives), new for each test run and removed after it.
  if not hasattr(config, 'workerinput') and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    config.xla_cache = tempfile.mkdtemp(prefix='spactor_jax_tests_xla_cache_')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = config.xla_cache
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'
  config.addinivalue_line(
      'markers', 'slow: end-to-end runs and compiles of a minute or more; '
      'pytest -m "not slow" runs the fast set')


def pytest_collection_modifyitems(items):
  # pytest-xdist hands tests out in collection order: the modules with slow tests go
  # first (each module's tests kept together and in order), so the workers end on short
  # tests rather than one waiting for the other's last long one.
  slow = {item.module for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.module not in slow)


def pytest_unconfigure(config):
  if getattr(config, 'xla_cache', None):
    shutil.rmtree(config.xla_cache, ignore_errors=True)


@pytest.fixture(autouse=True, scope='module')
def _no_gin_bindings_across_modules():
  """Bindings a test module leaves behind never reach the next module of its worker."""
  gin.clear_config()
  yield
  gin.clear_config()
