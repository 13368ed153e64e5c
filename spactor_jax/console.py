"""A quiet start: TensorFlow's and libtpu's start-up lines kept off the console.

The entry points call ``quiet()`` before anything imports TensorFlow or starts
a jax backend. TensorFlow (only the input pipeline uses it), when installed,
is imported with the process's stderr captured, and kept off the GPUs so
that it neither probes CUDA nor takes their memory from jax; what it printed
is shown only if the import fails. On a machine without TPU chips, jax is
kept from loading libtpu (installed by ``.[tpu]`` for ahead-of-time
compilation), whose failed start-up prints errors, unless ``JAX_PLATFORMS``
says otherwise or a jax GPU plugin is installed.
"""

import contextlib
import importlib.util
import os
import sys
import tempfile

_GPU_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                'jax_rocm7_plugin')


@contextlib.contextmanager
def _captured_stderr():
  """Sends file descriptor 2 to a temporary file; replays it if the body raises."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      capture.seek(0)
      sys.stderr.write(capture.read().decode(errors='replace'))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def quiet() -> None:
  """Imports TensorFlow quietly (CPU only), when installed, and keeps an absent
  TPU from being probed."""
  if 'tensorflow' not in sys.modules:
    with _captured_stderr():
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
      except ModuleNotFoundError as exc:  # installed without it: a pre-built input run
        if exc.name != 'tensorflow':
          raise
      else:
        tf.config.set_visible_devices([], 'GPU')
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if (jax.config.jax_platforms is None and
      not any(importlib.util.find_spec(p) for p in _GPU_PLUGINS) and
      hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0):
    jax.config.update('jax_platforms', 'cpu')
