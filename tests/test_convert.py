"""spactor_jax.convert: T5X and Hugging Face checkpoints in and out.

References are independent of the code under test: parameters are compared
with the NumPy values the test wrote (through orbax's own reader), T5X
folders are written and read here following T5X's ``checkpoints.py``, and
the exported model runs in ``transformers``' own T5 classes.
"""

import json
import os

from etils import epath
from flax import serialization
from flax import traverse_util
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

import helpers
from helpers import fresh_gin  # pylint: disable=unused-import
from spactor_jax import checkpoints
from spactor_jax import convert
from spactor_jax import gin_utils
from spactor_jax import network
from spactor_jax import train

try:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  NO_TORCH = ''
except ImportError as exc:
  NO_TORCH = (f'{exc}; install the CPU wheel: pip install torch --index-url '
              'https://download.pytorch.org/whl/cpu && pip install transformers')

T5_GIN = 'gin_configs/quickstart.gin'
ELECTRA_GIN = 'gin_configs/quickstart_electra.gin'
SMALL = ['--gin.BATCH_SIZE=8', '--gin.EVAL_EVERY_STEPS=0']
T5X_STEP = 5000


def _config(gin_file, model_dir):
  gin_utils.parse_with_tasks(gin_utils.split_flags(
      [f'--gin_file={gin_file}', f'--gin.MODEL_DIR={model_dir}'] + SMALL)[0])
  return train.run_config()


def _source_run(gin_file, model_dir):
  """A run's checkpoint at step 7: every initial parameter times 1 + 0.5 N(0, 1) (so no two
  norm scales or table entries agree, at the scales of a trained model); ``{path: array}``."""
  cwd = os.getcwd()
  os.chdir(helpers.REPO)
  try:
    config = _config(gin_file, model_dir)
    iterator, _, make_trainer = helpers.stage_trainers(config)
    state = make_trainer(0).init_state(jax.random.key(0))
  finally:
    os.chdir(cwd)
    gin.clear_config()
  rng = np.random.default_rng(1)
  noisy = jax.tree_util.tree_map(
      lambda x: jax.device_put(
          (np.asarray(x) * (1 + 0.5 * rng.normal(size=x.shape))).astype(x.dtype), x.sharding),
      state.params)
  checkpointer = checkpoints.Checkpointer(str(model_dir), async_save=False)
  assert checkpointer.save(7, state.replace(params=noisy), iterator, force=True)
  checkpointer.close()
  return _flat(jax.device_get(noisy))


def _flat(tree):
  return {'/'.join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _convert(*args):
  return helpers.run_main(convert.main, [str(a) for a in args] + SMALL)


def _assert_params(model_dir, step, expected):
  """The checkpoint's parameters (orbax's reader) are ``expected``, bit for bit."""
  held = _flat(helpers.raw_state(model_dir, step)['params'])
  assert sorted(held) == sorted(expected)
  for path, value in expected.items():
    assert held[path].dtype == value.dtype, path
    assert np.array_equal(held[path], value), path


@pytest.fixture(scope='module')
def t5_run(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp('t5_run')
  return model_dir, _source_run(T5_GIN, model_dir)


@pytest.fixture(scope='module')
def t5_hf(t5_run, tmp_path_factory):
  output = tmp_path_factory.mktemp('t5_hf')
  assert _convert('export_hf', f'--gin_file={T5_GIN}', f'--gin.MODEL_DIR={t5_run[0]}',
                  f'--output={output}') == 0
  return output


# --- Hugging Face -------------------------------------------------------------


def test_export_hf_writes_a_transformers_folder(t5_hf):
  config = json.loads((t5_hf / 'config.json').read_text())
  assert config['architectures'] == ['T5ForConditionalGeneration']
  assert (config['d_model'], config['num_layers'], config['vocab_size']) == (128, 2, 4096)
  assert config['feed_forward_proj'] == 'gated-gelu'
  assert {'model.safetensors', 'spiece.model', 'tokenizer_config.json'} <= set(os.listdir(t5_hf))
  assert not (t5_hf / 'spactor_params.safetensors').exists()  # span corruption: T5 only


def test_hf_round_trip_is_bit_exact(t5_run, t5_hf, tmp_path):
  assert _convert('import_hf', f'--checkpoint={t5_hf}', f'--gin_file={T5_GIN}',
                  f'--gin.MODEL_DIR={tmp_path}') == 0
  _assert_params(tmp_path, 0, t5_run[1])


def _project_logits(params, enc, dec):
  config = network.TransformerConfig(vocab_size=4096, emb_dim=128, num_heads=4, head_dim=32,
                                     num_encoder_layers=2, num_decoder_layers=2, mlp_dim=256)
  return np.asarray(network.EncoderDecoder(config).apply(
      {'params': traverse_util.unflatten_dict(params, sep='/')['model']},
      jnp.asarray(enc), jnp.asarray(dec)))


def _differences(ours, theirs):
  """(max abs, max rel over logits above 1% of the largest) differences."""
  diff = np.abs(ours - theirs)
  big = np.abs(theirs) > 0.01 * np.abs(theirs).max()
  return float(diff.max()), float((diff[big] / np.abs(theirs[big])).max())


@pytest.mark.skipif(bool(NO_TORCH), reason=NO_TORCH)
def test_hf_logits_match_the_project_forward(t5_run, t5_hf):
  model = transformers.T5ForConditionalGeneration.from_pretrained(t5_hf).eval()
  rng = np.random.default_rng(2)
  enc = rng.integers(3, 4000, (3, 24))
  enc[1, 17:] = 0  # padding
  dec = rng.integers(3, 4000, (3, 10))
  dec[:, 0] = 0  # the decoder start
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                   decoder_input_ids=torch.tensor(dec)).logits.numpy()
  ours = _project_logits(t5_run[1], enc, dec)
  max_abs, max_rel = _differences(ours, theirs)
  print(f'T5ForConditionalGeneration logits: max abs {max_abs:.3g}, max rel {max_rel:.3g}, '
        f'largest logit {np.abs(theirs).max():.3g}')
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


@pytest.fixture(scope='module')
def electra(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp('electra_run')
  expected = _source_run(ELECTRA_GIN, model_dir)
  output = tmp_path_factory.mktemp('electra_hf')
  assert _convert('export_hf', f'--gin_file={ELECTRA_GIN}', f'--gin.MODEL_DIR={model_dir}',
                  f'--output={output}') == 0
  return expected, output


def test_encoder_export_has_a_side_file_and_round_trips(electra, tmp_path):
  expected, output = electra
  config = json.loads((output / 'config.json').read_text())
  assert config['architectures'] == ['T5EncoderModel']
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  side = safetensors_numpy.load_file(str(output / 'spactor_params.safetensors'))
  assert sorted(side) == sorted(p for p in expected if not p.startswith('model/'))
  assert any(p.startswith('rtd_head/') for p in side) and any(
      p.startswith('generator/') for p in side)
  assert _convert('import_hf', f'--checkpoint={output}', f'--gin_file={ELECTRA_GIN}',
                  f'--gin.MODEL_DIR={tmp_path}') == 0
  _assert_params(tmp_path, 0, expected)


@pytest.mark.skipif(bool(NO_TORCH), reason=NO_TORCH)
def test_encoder_hidden_states_match_t5_encoder_model(electra):
  expected, output = electra
  model = transformers.T5EncoderModel.from_pretrained(output).eval()
  hf_config = json.loads((output / 'config.json').read_text())
  config = network.TransformerConfig(
      vocab_size=hf_config['vocab_size'], emb_dim=hf_config['d_model'],
      num_heads=hf_config['num_heads'], head_dim=hf_config['d_kv'],
      num_encoder_layers=hf_config['num_layers'], num_decoder_layers=0,
      mlp_dim=hf_config['d_ff'], mlp_activations=('gelu',))  # encoder_tiny.gin's
  assert hf_config['feed_forward_proj'] == 'gelu_new'  # HF's tanh GELU, flax's
  tokens = np.random.default_rng(3).integers(3, 4000, (2, 16))
  tokens[0, 12:] = 0
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens),
                   attention_mask=torch.tensor(tokens > 0)).last_hidden_state.numpy()
  ours = np.asarray(network.EncoderOnly(config).apply(
      {'params': traverse_util.unflatten_dict(expected, sep='/')['model']},
      jnp.asarray(tokens)))
  valid = tokens > 0
  max_abs, max_rel = _differences(ours[valid], theirs[valid])
  print(f'T5EncoderModel hidden states: max abs {max_abs:.3g}, max rel {max_rel:.3g}')
  np.testing.assert_allclose(ours[valid], theirs[valid], rtol=1e-4,
                             atol=1e-4 * np.abs(theirs).max())


def test_decoder_only_export_is_refused_in_one_line(tmp_path, capsys):
  assert _convert('export_hf', '--gin_file=gin_configs/quickstart_headless_causal_lm.gin',
                  f'--gin.MODEL_DIR={tmp_path}', f'--output={tmp_path / "out"}') == 2
  _assert_one_error(capsys, 'no Hugging Face class')


# --- T5X --------------------------------------------------------------------


def _write_t5x(model_dir, params, step, *, inline=()):
  """A T5X checkpoint as T5X's ``Checkpointer.save`` lays it out: zarr arrays
  (gzip) named by their state path, a msgpack file of the state with their
  relative specs; ``inline`` arrays go into the msgpack file itself."""
  step_dir = epath.Path(model_dir) / f'checkpoint_{step}'
  target = {}
  for path, value in params.items():
    name = f'target/{path}'
    if path in inline:
      leaf = value
    else:
      leaf = {'driver': 'zarr', 'dtype': value.dtype.name,
              'kvstore': {'driver': 'file', 'path': name.replace('/', '.')},
              'metadata': {'compressor': {'id': 'gzip'}, 'shape': list(value.shape),
                           'chunks': list(value.shape)}}
      spec = dict(leaf, kvstore={'driver': 'file',
                                 'path': str(step_dir / name.replace('/', '.'))})
      ts.open(spec, create=True).result().write(value).result()
    target[path] = leaf
  moments = {'token_embedder': {'embedding': {
      'v_row': np.zeros(4096, np.float32), 'v_col': np.zeros(128, np.float32),
      'v': np.zeros(1, np.float32), 'm': np.zeros(1, np.float32)}}}
  step_dir.mkdir(parents=True, exist_ok=True)
  # T5X's to_bytes turns each ts.Spec into its JSON (lists stay msgpack arrays).
  (step_dir / 'checkpoint').write_bytes(serialization.msgpack_serialize(
      {'version': 3, 'optimizer': {'target': target, 'state': {
          'step': np.int32(step), 'param_states': moments}}}))
  return step_dir


def _read_t5x(step_dir):
  """T5X's ``load_t5x_checkpoint``'s reading: msgpack, then each spec's array."""
  contents = serialization.msgpack_restore((epath.Path(step_dir) / 'checkpoint').read_bytes())
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      path = f'{prefix}/{key}' if prefix else key
      if isinstance(value, dict) and 'driver' not in value:
        walk(value, path)
      elif isinstance(value, dict):
        spec = json.loads(json.dumps(value))
        del spec['metadata']['chunks'], spec['metadata']['compressor']
        spec['kvstore']['path'] = os.path.join(step_dir, spec['kvstore']['path'])
        flat[path] = ts.open(spec, open=True).result().read().result()
      else:
        flat[path] = np.asarray(value)
  walk(contents['optimizer']['target'], '')
  return contents, flat


def _t5_params(expected):
  return {p[len('model/'):]: v for p, v in expected.items()}


@pytest.fixture(scope='module')
def t5x_dir(t5_run, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp('t5x_model')
  _write_t5x(model_dir, _t5_params(t5_run[1]), T5X_STEP,
             inline=('encoder/encoder_norm/scale',))
  return model_dir


@pytest.fixture(scope='module')
def t5x_import(t5x_dir, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp('t5x_import')
  assert _convert('import_t5x', f'--checkpoint={t5x_dir}', '--keep_step',
                  f'--gin_file={T5_GIN}', f'--gin.MODEL_DIR={model_dir}') == 0
  return model_dir


def test_t5x_import_keeps_values_and_step(t5_run, t5x_import):
  _assert_params(t5x_import, T5X_STEP, t5_run[1])
  state = helpers.raw_state(t5x_import, T5X_STEP)
  assert int(state['step']) == T5X_STEP
  counts = [int(x) for x in jax.tree_util.tree_leaves(state['opt_state'])
            if np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.integer)]
  assert counts and set(counts) == {T5X_STEP}


def test_continued_pretraining_goes_on_with_t5x_learning_rate(t5x_import):
  assert helpers.run_main(train.main, [
      f'--gin_file={T5_GIN}', f'--gin.MODEL_DIR={t5x_import}', f'--gin.TRAIN_STEPS={T5X_STEP + 1}',
      '--gin.LOG_EVERY_STEPS=1'] + SMALL) == 0
  lr = helpers.logged_scalars(str(t5x_import), 'learning_rate')
  # quickstart.gin: 1.0 / sqrt(max(step, 1000)); a fresh start would use 1/sqrt(1000).
  assert lr[T5X_STEP + 1] == pytest.approx(1 / np.sqrt(T5X_STEP), rel=1e-6)


def test_t5x_import_without_keep_step_starts_at_zero(t5_run, t5x_dir, tmp_path):
  assert _convert('import_t5x', f'--checkpoint={t5x_dir / f"checkpoint_{T5X_STEP}"}',
                  f'--gin_file={T5_GIN}', f'--gin.MODEL_DIR={tmp_path}') == 0
  _assert_params(tmp_path, 0, t5_run[1])


def test_t5x_round_trip_is_bit_exact(t5_run, tmp_path):
  model_dir, expected = t5_run
  assert _convert('export_t5x', f'--gin_file={T5_GIN}', f'--gin.MODEL_DIR={model_dir}',
                  f'--output={tmp_path / "t5x"}') == 0
  contents, written = _read_t5x(tmp_path / 't5x' / 'checkpoint_7')
  assert contents['version'] == 3 and int(contents['optimizer']['state']['step']) == 7
  assert sorted(written) == sorted(_t5_params(expected))
  for path, value in _t5_params(expected).items():
    assert np.array_equal(written[path], value) and written[path].dtype == value.dtype, path
  assert _convert('import_t5x', f'--checkpoint={tmp_path / "t5x"}', '--keep_step',
                  f'--gin_file={T5_GIN}', f'--gin.MODEL_DIR={tmp_path / "back"}') == 0
  _assert_params(tmp_path / 'back', 7, expected)


def _assert_one_error(capsys, *words):
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and 'Traceback' not in err, err
  assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.parametrize('damage, words', [
    ('wrong_size', ('shapes differ', 'encoder/encoder_norm/scale (128,) vs', '(64,)')),
    ('missing_array', ('cannot be read', 'target/decoder/decoder_norm/scale')),
    ('missing_path', ('no source', 'model/decoder/decoder_norm/scale')),
    ('unknown_path', ('no place in the model', 'encoder/extra/kernel')),
])
def test_t5x_mistakes_are_one_error_line(t5_run, tmp_path, capsys, damage, words):
  params = _t5_params(t5_run[1])
  if damage == 'wrong_size':
    params['encoder/encoder_norm/scale'] = np.ones(64, np.float32)
  elif damage == 'missing_path':
    del params['decoder/decoder_norm/scale']
  elif damage == 'unknown_path':
    params['encoder/extra/kernel'] = np.ones((2, 2), np.float32)
  step_dir = _write_t5x(tmp_path / 't5x', params, 1)
  if damage == 'missing_array':
    (step_dir / 'target.decoder.decoder_norm.scale').rmtree()
  capsys.readouterr()
  assert _convert('import_t5x', f'--checkpoint={tmp_path / "t5x"}', f'--gin_file={T5_GIN}',
                  f'--gin.MODEL_DIR={tmp_path / "new"}') == 2
  _assert_one_error(capsys, *words)


@pytest.mark.parametrize('args, words', [
    (['export'], ('first argument must be one of import_t5x, import_hf, export_hf, export_t5x',)),
    (['import_t5x'], ('import_t5x needs --checkpoint=DIR',)),
    (['export_hf', '--output=/tmp/x', '--checkpoint=/tmp/y'], ('does not take', '--step=...')),
    (['export_t5x', '--output=/tmp/x', '--step=last'], ('--step=last must be a checkpoint step',)),
])
def test_wrong_arguments_are_one_error_line(tmp_path, capsys, args, words):
  assert _convert(*args, f'--gin_file={T5_GIN}', f'--gin.MODEL_DIR={tmp_path}') == 2
  _assert_one_error(capsys, *words)


@pytest.mark.skipif(bool(NO_TORCH), reason=NO_TORCH)
def test_import_hf_of_a_transformers_saved_model(tmp_path):
  """A T5 v1.1-style model initialised and saved by ``transformers`` itself."""
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=4096, d_model=128, d_kv=32, d_ff=256, num_heads=4, num_layers=2,
      num_decoder_layers=2, feed_forward_proj='gated-gelu', tie_word_embeddings=False,
      dropout_rate=0.0, decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(config).eval()
  model.save_pretrained(tmp_path / 'hf', safe_serialization=True)
  assert _convert('import_hf', f'--checkpoint={tmp_path / "hf"}', f'--gin_file={T5_GIN}',
                  f'--gin.MODEL_DIR={tmp_path / "run"}') == 0
  params = _flat(helpers.raw_state(tmp_path / 'run', 0)['params'])
  rng = np.random.default_rng(4)
  enc = rng.integers(3, 4000, (2, 16))
  enc[0, 11:] = 0
  dec = rng.integers(3, 4000, (2, 8))
  dec[:, 0] = 0
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                   decoder_input_ids=torch.tensor(dec)).logits.numpy()
  ours = _project_logits(params, enc, dec)
  max_abs, max_rel = _differences(ours, theirs)
  print(f'imported transformers T5: max abs {max_abs:.3g}, max rel {max_rel:.3g}')
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
  # bfloat16 weights (which safetensors.numpy cannot read) arrive exactly as float32.
  model.to(torch.bfloat16).save_pretrained(tmp_path / 'bf16', safe_serialization=True)
  assert _convert('import_hf', f'--checkpoint={tmp_path / "bf16"}', f'--gin_file={T5_GIN}',
                  f'--gin.MODEL_DIR={tmp_path / "bf16_run"}') == 0
  held = _flat(helpers.raw_state(tmp_path / 'bf16_run', 0)['params'])
  embedding = model.shared.weight.detach().float().numpy()
  assert np.array_equal(held['model/token_embedder/embedding'], embedding)
  query = model.encoder.block[1].layer[0].SelfAttention.q.weight.detach().float().numpy()
  assert np.array_equal(held['model/encoder/layers_1/attention/query/kernel'], query.T)


@pytest.mark.parametrize('gin_file, new', [
    ('gin_configs/quickstart_spactor.gin', ('generator/', 'rtd_head/')),  # initialised
    ('gin_configs/quickstart_headless_t5.gin', None),  # no vocabulary head
])
def test_t5x_import_for_other_encoder_decoder_objectives(t5_run, t5x_dir, tmp_path, gin_file,
                                                        new):
  assert _convert('import_t5x', f'--checkpoint={t5x_dir}', f'--gin_file={gin_file}',
                  f'--gin.MODEL_DIR={tmp_path}') == 0
  held = _flat(helpers.raw_state(tmp_path, 0)['params'])
  expected = {p: v for p, v in t5_run[1].items() if p in held or new is not None}
  assert 'model/decoder/logits_dense/kernel' in expected or new is None
  for path, value in expected.items():
    assert np.array_equal(held[path], value), path
  others = sorted(set(held) - set(expected))
  assert (others and all(p.startswith(new) for p in others)) if new else others == []
