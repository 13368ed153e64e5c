"""Fine-tuning: params-only loading, the three heads, keep-best, resume, one-line errors.

Toy seqio tasks registered here stand in for the downstream tasks:
``ft_test_cls`` (label = whether token ``MARK`` occurs: separable),
``ft_test_t2t`` (text to text) and ``ft_test_choices`` (one row per choice).
"""

import functools
import json
import os

from etils import epath
import flax.linen as nn
import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio
import t5.evaluation.metrics
import tensorflow as tf

import helpers
from helpers import fresh_gin  # pylint: disable=unused-import
import tasks
from spactor_jax import checkpoints
from spactor_jax import curriculum
from spactor_jax import downstream_eval
from spactor_jax import downstream_hook
from spactor_jax import downstream_features
from spactor_jax import evaluation
from spactor_jax import finetune
from spactor_jax import gin_utils
from spactor_jax import network
from spactor_jax import optimizers
from spactor_jax import param_loading
from spactor_jax import partitioning
from spactor_jax import training
from spactor_jax.data import pipeline
from spactor_jax.objectives import electra
from spactor_jax.objectives import finetuning
from spactor_jax.objectives import headless
from spactor_jax.objectives import span_corruption

VOCAB = tasks.vocab.pdtext_vocabulary()
VOCAB_INFO = tasks.vocab.vocab_info(VOCAB)
CLS = VOCAB_INFO.cls_id
MARK = 7  # the token whose presence is the toy label; never drawn otherwise
CONFIG = network.TransformerConfig(
    vocab_size=4096, emb_dim=64, num_heads=4, head_dim=16, num_encoder_layers=1,
    num_decoder_layers=1, mlp_dim=128, mlp_activations=('gelu',))
MESH = partitioning.MeshConfig(ici=(-1, 1, 1))
SPLITS = {'train': (0, 1024), 'validation': (1, 64), 'test': (2, 64)}


def _cls_dataset(split, shuffle_files=False, seed=None):
  del shuffle_files, seed
  split_seed, count = SPLITS[split]
  rng = np.random.default_rng(split_seed)
  tokens = rng.integers(10, 300, size=(count, 14))
  labels = np.arange(count) % 2
  tokens[labels == 1, rng.integers(0, 14, size=count)[labels == 1]] = MARK
  inputs = np.concatenate([np.full((count, 1), CLS), tokens, np.ones((count, 1))], axis=1)
  return tf.data.Dataset.from_tensor_slices(
      {'inputs': inputs.astype(np.int32), 'label': labels.astype(np.int32)})


WORDS = ['lord', 'king', 'house', 'water', 'night', 'city', 'heart', 'land']


def _t2t_dataset(split, shuffle_files=False, seed=None):
  del shuffle_files, seed
  split_seed, count = SPLITS[split]
  rng = np.random.default_rng(split_seed)
  inputs = [' '.join(rng.choice(WORDS, 5)) for _ in range(count)]
  targets = ['yes' if 'lord' in text.split() else 'no' for text in inputs]
  return tf.data.Dataset.from_tensor_slices({'inputs': inputs, 'targets': targets})


def _choices_dataset(split, shuffle_files=False, seed=None):
  del shuffle_files, seed
  split_seed, count = SPLITS[split]
  rng = np.random.default_rng(split_seed)
  rows = {name: [] for name in ('targets', 'loss_mask', 'example', 'choice', 'label')}
  for example in range(count // 4):
    context = list(rng.integers(10, 300, size=6))
    label = int(rng.integers(0, 3))
    for choice in range(3):
      word = list(rng.integers(10, 300, size=2))
      rows['targets'].append(context + word)
      rows['loss_mask'].append([0] * 6 + [1] * 2)
      rows['example'].append(example)
      rows['choice'].append(choice)
      rows['label'].append(label)
  data = {name: np.asarray(value, np.int32) for name, value in rows.items()}
  return tf.data.Dataset.from_tensor_slices(data)


def _register():
  splits = tuple(SPLITS)
  accuracy = [t5.evaluation.metrics.accuracy]
  scalar = seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=tf.int32,
                         rank=0)
  seqio.TaskRegistry.add('ft_test_cls', seqio.FunctionDataSource(_cls_dataset, splits),
                         preprocessors=[], metric_fns=accuracy,
                         output_features={'inputs': seqio.Feature(VOCAB, add_eos=False),
                                          'label': scalar})
  seqio.TaskRegistry.add(
      'ft_test_t2t', seqio.FunctionDataSource(_t2t_dataset, splits),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features={'inputs': seqio.Feature(VOCAB), 'targets': seqio.Feature(VOCAB)},
      metric_fns=accuracy)
  seqio.TaskRegistry.add(
      'ft_test_choices', seqio.FunctionDataSource(_choices_dataset, splits), preprocessors=[],
      output_features={'targets': seqio.Feature(VOCAB, add_eos=False),
                       'loss_mask': seqio.Feature(seqio.PassThroughVocabulary(size=0),
                                                  add_eos=False, dtype=tf.int32),
                       'example': scalar, 'choice': scalar, 'label': scalar},
      metric_fns=accuracy)


for _name in ('ft_test_cls', 'ft_test_t2t', 'ft_test_choices'):
  seqio.TaskRegistry.remove(_name)
_register()


def _flat(tree):
  return {'/'.join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _stored_params(directory):
  """A checkpoint's parameters read independently with orbax, as NumPy."""
  with ocp.StandardCheckpointer() as reader:
    return _flat(reader.restore(epath.Path(directory) / 'state')['params'])


def _pretrain(model_dir, objective, task, lengths, family):
  """A pre-training checkpoint of ``objective`` at step 1 (initial values of seed 5)."""
  iterator = pipeline.make_iterator(pipeline.DataConfig(task, lengths), family, 8,
                                    seqio.ShardInfo(0, 1), model_vocab_size=CONFIG.vocab_size)
  trainer = helpers.make_trainer(objective(config=CONFIG, vocab=VOCAB_INFO),
                                 iterator.element_spec, MESH)
  state = trainer.init_state(jax.random.key(5)).replace(step=np.int32(1))
  saver = checkpoints.Checkpointer(str(model_dir), async_save=False)
  assert saver.save(1, state, iterator, force=True)
  saver.close()
  return str(model_dir)


@pytest.fixture(scope='module')
def electra_run(tmp_path_factory):
  return _pretrain(tmp_path_factory.mktemp('electra'), electra.ELECTRA,
                   'pdtext_mlm_all_mask', {'inputs': 16}, 'encoder')


@pytest.fixture(scope='module')
def t5_run(tmp_path_factory):
  return _pretrain(tmp_path_factory.mktemp('t5'), span_corruption.SpanCorruption,
                   'pdtext_span_corruption', {'inputs': 32, 'targets': 8}, 'encoder_decoder')


def _config(model_dir, init_dir, objective, task, lengths, steps, *, converter=None,
            learning_rate=1e-3, dont_load=(), ignore_unused=(), init_from=None,
            save_every=1000):
  return training.RunConfig(
      model_dir=str(model_dir),
      data=pipeline.DataConfig(task, lengths, pack=False, feature_converter=converter),
      curriculum=curriculum.Curriculum([curriculum.Stage(objective, init_from=init_from or {})]),
      model=CONFIG, total_steps=steps, batch_size=16, optimizer=optimizers.adafactor,
      learning_rate=optimizers.constant_schedule(learning_rate), mesh=MESH,
      log_every_steps=10,
      checkpointer=functools.partial(checkpoints.Checkpointer, save_every_steps=save_every,
                                     keep=None, async_save=False),
      init_params=param_loading.ParamSource(init_dir, prefixes={'model': 'model'},
                                            dont_load=dont_load, ignore_unused=ignore_unused))


def _cls_config(model_dir, init_dir, steps, **kwargs):
  return _config(model_dir, init_dir, finetuning.Classification, 'ft_test_cls',
                 {'inputs': 16}, steps, converter=downstream_features.ClassificationFeatureConverter,
                 dont_load=[r'cls_head/.*'], **kwargs)


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _fresh_classifier_params(seed):
  """The classification head's initializer output with a run's seed, by path."""
  params_rng = jax.random.split(jax.random.key(seed), 3)[0]
  batch = {'encoder_input_tokens': np.ones((1, 16), np.int32), 'label': np.ones((1, 1), np.int32)}
  objective = finetuning.Classification(config=CONFIG, vocab=VOCAB_INFO)
  return _flat(nn.unbox(objective.init({'params': params_rng}, batch,
                                       objective.denominators(batch),
                                       enable_dropout=False)['params']))


@pytest.mark.slow
def test_loads_exactly_the_discriminator_and_initialises_the_head(electra_run, tmp_path):
  # Learning rate 0: the final parameters are the initial ones.
  config = _cls_config(tmp_path, electra_run, 1, learning_rate=0.0)
  finetune.finetune(config, downstream_hook.DownstreamEval(every_steps=1, test_split=None))
  pretrained = _stored_params(os.path.join(electra_run, 'checkpoints', '1'))
  tuned = _stored_params(tmp_path / 'checkpoints' / '1')
  assert any(p.startswith('generator/') for p in pretrained)
  assert any(p.startswith('rtd_head/') for p in pretrained)
  model_paths = {p for p in pretrained if p.startswith('model/')}
  record = _read_json(tmp_path / 'init_params.json')
  assert set(record['loaded']) == model_paths
  assert set(record['new']) == {p for p in tuned if p.startswith('cls_head/')} != set()
  assert set(tuned) == model_paths | set(record['new'])
  for path in model_paths:
    np.testing.assert_array_equal(tuned[path], pretrained[path], err_msg=path)
  # The head is its initializer's output: the objective initialised with the run's seed.
  fresh = _fresh_classifier_params(config.seed)
  for path in record['new']:
    np.testing.assert_array_equal(tuned[path], fresh[path], err_msg=path)
  # ... and the loaded ones are not: loading did something.
  assert not np.array_equal(fresh['model/token_embedder/embedding'],
                            tuned['model/token_embedder/embedding'])


@pytest.mark.slow
def test_without_a_checkpoint_every_parameter_starts_fresh(electra_run, tmp_path):
  """INIT_CHECKPOINT = None: nothing is read; the weights are the seed's initialisation."""
  config = _cls_config(tmp_path / 'scratch', None, 1, learning_rate=0.0)
  finetune.finetune(config, downstream_hook.DownstreamEval(every_steps=1, test_split=None))
  tuned = _stored_params(tmp_path / 'scratch' / 'checkpoints' / '1')
  record = _read_json(tmp_path / 'scratch' / 'init_params.json')
  assert record['model_dir'] is None and record['loaded'] == []
  assert set(record['new']) == set(tuned)
  # Every weight is the initializer's output with the run's seed, not the checkpoint's.
  fresh = _fresh_classifier_params(config.seed)
  pretrained = _stored_params(os.path.join(electra_run, 'checkpoints', '1'))
  for path, value in tuned.items():
    np.testing.assert_array_equal(value, fresh[path], err_msg=path)
  assert not np.array_equal(tuned['model/token_embedder/embedding'],
                            pretrained['model/token_embedder/embedding'])


CLS_STEPS = 40


@pytest.fixture(scope='module')
def cls_run(electra_run, tmp_path_factory):
  """A fine-tuning run on the separable toy task: scored and checkpointed every 10 steps."""
  model_dir = tmp_path_factory.mktemp('cls_run')
  config = _cls_config(model_dir, electra_run, CLS_STEPS, learning_rate=1e-2, save_every=10)
  return model_dir, finetune.finetune(config, downstream_hook.DownstreamEval(every_steps=10))


@pytest.mark.slow
def test_classification_learns_a_separable_task_and_keeps_the_best_step(cls_run):
  model_dir, result = cls_run
  history = {}
  for line in (model_dir / 'finetune_evals.jsonl').read_text().splitlines():
    entry = json.loads(line)
    history[entry['step']] = entry['metrics']['accuracy']
  assert sorted(history) == list(range(10, CLS_STEPS + 1, 10))
  best = max(history, key=lambda step: (history[step], -step))  # the first of the best
  assert result == _read_json(model_dir / 'finetune_metrics.json')
  assert result['task'] == 'ft_test_cls' and result['metric'] == 'accuracy'
  assert result['best'] == {'step': best, 'value': history[best],
                            'metrics': {'accuracy': history[best]}}
  assert result['final'] == {'step': CLS_STEPS, 'metrics': {'accuracy': history[CLS_STEPS]}}
  assert result['best']['value'] >= 95.0, history
  assert result['test']['metrics']['accuracy'] >= 90.0
  # Per-item results: the test split's labels in order, and the accuracy they give.
  items = result['test']['items']
  labels = [int(x['label']) for x in _cls_dataset('test').as_numpy_iterator()]
  assert items['targets'] == labels and len(items['predictions']) == len(labels)
  hits = [int(t == p) for t, p in zip(items['targets'], items['predictions'])]
  assert result['test']['metrics']['accuracy'] == pytest.approx(100 * np.mean(hits))
  # The kept parameters are the best step's (a checkpoint of every 10th step to compare).
  kept = list((model_dir / 'best' / 'checkpoints').iterdir())
  assert [p.name for p in kept] == [str(best)]
  at_best = _stored_params(model_dir / 'checkpoints' / str(best))
  for path, value in _stored_params(kept[0]).items():
    np.testing.assert_array_equal(value, at_best[path], err_msg=path)


@pytest.mark.slow
def test_eval_scores_the_kept_best_parameters_as_the_run_did(cls_run, electra_run):
  model_dir, result = cls_run
  config = evaluation.EvalConfig(
      run=_cls_config(model_dir, electra_run, CLS_STEPS), split='test', best=True)
  scored = downstream_eval.score_checkpoint(config)
  assert scored['step'] == result['best']['step']
  assert scored['metrics'] == result['test']['metrics']


@pytest.mark.slow
def test_resume_continues_its_own_state_without_reloading_the_init_checkpoint(
    cls_run, electra_run, tmp_path):
  straight, straight_result = cls_run
  settings = downstream_hook.DownstreamEval(every_steps=10)
  finetune.finetune(_cls_config(tmp_path, electra_run, 20, learning_rate=1e-2, save_every=10),
                    settings)
  # The second start would fail if it read INIT_CHECKPOINT: it no longer exists.
  result = finetune.finetune(_cls_config(tmp_path, str(tmp_path / 'gone'), CLS_STEPS,
                                         learning_rate=1e-2, save_every=10), settings)
  assert result == straight_result
  want = _stored_params(straight / 'checkpoints' / str(CLS_STEPS))
  got = _stored_params(tmp_path / 'checkpoints' / str(CLS_STEPS))
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=path)


@pytest.mark.slow
def test_text_to_text_predictions_go_through_the_task_metric(t5_run, tmp_path):
  config = _config(tmp_path, t5_run, finetuning.TextToText, 'ft_test_t2t',
                   {'inputs': 16, 'targets': 4}, 2)
  result = finetune.finetune(config, downstream_hook.DownstreamEval(every_steps=2))
  assert set(result['final']['metrics']) == {'accuracy'}
  prediction_set = downstream_eval.read_split(config.data, 'encoder_decoder', 'ft_test_t2t',
                                              'validation', 16)
  answers = [e['targets_pretokenized'].decode() for e in prediction_set.examples]
  assert set(answers) == {'yes', 'no'}

  def ids(texts):
    out = np.zeros((len(texts), 4), np.int32)
    for row, text in enumerate(texts):
      encoded = VOCAB.encode(text) + [1]
      out[row, :len(encoded)] = encoded
    return out

  right = downstream_eval.score(prediction_set, 'text', ids(answers))
  wrong = downstream_eval.score(prediction_set, 'text',
                                ids(['no' if a == 'yes' else 'yes' for a in answers]))
  assert right == {'accuracy': 100.0} and wrong == {'accuracy': 0.0}


@pytest.mark.slow
def test_choice_scoring_picks_the_most_likely_choice(tmp_path):
  data = pipeline.DataConfig('ft_test_choices', {'targets': 12}, pack=False,
                             feature_converter=downstream_features.ChoiceScoringFeatureConverter)
  prediction_set = downstream_eval.read_split(data, 'decoder', 'ft_test_choices', 'validation',
                                              16)
  spec = {k: ((16,) + v.shape[1:], v.dtype) for k, v in prediction_set.batches[0].items()}
  trainer = helpers.make_trainer(finetuning.ChoiceScoring(config=CONFIG, vocab=VOCAB_INFO),
                                 spec, MESH)
  state = trainer.init_state(jax.random.key(3))
  targets, predictions = downstream_eval.targets_and_predictions(
      prediction_set, 'choice', downstream_eval.predict(trainer, state.params, prediction_set))
  # Reference: NumPy log-softmax of the decoder's logits, summed over each choice's tokens.
  model = network.DecoderOnly(CONFIG)
  params = jax.device_get(state.params['model'])
  examples = prediction_set.examples
  scores = {}
  for example in examples:
    tokens = np.pad(example['targets'], (0, 12 - len(example['targets'])))
    mask = np.pad(example['loss_mask'], (0, 12 - len(example['loss_mask'])))
    logits = np.asarray(model.apply({'params': params}, np.concatenate([[0], tokens[:-1]])[None],
                                    method=lambda m, t: m.logits(m(t))), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    ll = np.sum(log_probs[np.arange(12), tokens] * mask)
    scores.setdefault(int(example['example']), []).append(ll)
  assert len(scores) == 16 and all(len(s) == 3 for s in scores.values())
  assert predictions == [int(np.argmax(scores[e])) for e in sorted(scores)]
  labels = {int(e['example']): int(e['label']) for e in examples}
  assert targets == [labels[e] for e in sorted(labels)]
  assert len(set(predictions)) > 1  # the reference is not trivially one answer


def test_choice_scores_go_through_the_task_score_metric():
  # pdtext_last_word_choices scores with a seqio score metric over postprocessed targets.
  data = pipeline.DataConfig('pdtext_last_word_choices', {'targets': 64}, pack=False,
                             feature_converter=downstream_features.ChoiceScoringFeatureConverter)
  prediction_set = downstream_eval.read_split(data, 'decoder', 'pdtext_last_word_choices',
                                              'validation', 16, max_examples=40)
  right = np.array([e['choice'] == e['label'] for e in prediction_set.examples], np.float32)
  assert downstream_eval.score(prediction_set, 'choice', right) == {'accuracy': 100.0}
  assert downstream_eval.score(prediction_set, 'choice', -right) == {'accuracy': 0.0}


@pytest.mark.slow
def test_choice_scoring_from_a_headless_decoder_gets_the_embedding_as_its_head(tmp_path):
  init_dir = _pretrain(tmp_path / 'headless', headless.HeadlessCausalLM, 'pdtext_causal_lm',
                       {'targets': 16}, 'decoder')
  head = 'model/decoder/logits_dense/kernel'
  config = _config(tmp_path / 'tuned', init_dir, finetuning.ChoiceScoring, 'ft_test_choices',
                   {'targets': 12}, 1, learning_rate=0.0,
                   converter=downstream_features.ChoiceScoringFeatureConverter,
                   dont_load=[head], init_from={head: ('model/token_embedder/embedding',
                                                       'transpose')})
  result = finetune.finetune(config, downstream_hook.DownstreamEval(every_steps=1))
  assert set(result['best']['metrics']) == {'accuracy'} and result['test'] is not None
  pretrained = _stored_params(os.path.join(init_dir, 'checkpoints', '1'))
  tuned = _stored_params(tmp_path / 'tuned' / 'checkpoints' / '1')
  assert head not in pretrained
  np.testing.assert_array_equal(tuned[head], pretrained['model/token_embedder/embedding'].T)
  assert _read_json(tmp_path / 'tuned' / 'init_params.json')['new'] == [head]


def _main(args):
  gin.clear_config()
  return finetune.main(args)


def test_bad_inputs_are_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(helpers.REPO)
  base = ['--gin_file=gin_configs/models/encoder_tiny.gin', '--gin_file=runs/finetune.gin',
          '--gin_file=finetune/classification.gin', '--gin.TransformerConfig.vocab_size=4096',
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 16}", '--gin.TRAIN_STEPS=1',
          '--gin.BATCH_SIZE=8']
  missing = base + [f'--gin.INIT_CHECKPOINT={tmp_path / "nothing"}',
                    '--gin.MIXTURE_OR_TASK_NAME=ft_test_cls', f'--gin.MODEL_DIR={tmp_path / "a"}']
  assert _main(missing) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
  assert len(err) == 1 and err[0].startswith('error: INIT_CHECKPOINT: ') and \
      'has no checkpoint' in err[0], err
  no_label = base + [f'--gin.INIT_CHECKPOINT={tmp_path / "nothing"}',
                     '--gin.MIXTURE_OR_TASK_NAME=ft_test_t2t', f'--gin.MODEL_DIR={tmp_path / "b"}']
  assert _main(no_label) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error:')]
  assert len(err) == 1 and "the task lacks features ['label']" in err[0], err


ROUTE_FILES = sorted(
    os.path.relpath(os.path.join(root, name), os.path.join(helpers.REPO, 'gin_configs'))
    for root, _, names in os.walk(os.path.join(helpers.REPO, 'gin_configs', 'finetune'))
    for name in names)
HEADS = {'text': finetuning.TextToText, 'class': finetuning.Classification,
         'choice': finetuning.ChoiceScoring}


@pytest.mark.parametrize('route', ROUTE_FILES + ['quickstart_finetune.gin',
                                                 'quickstart_finetune_cls.gin'])
def test_route_files_build_a_finetuning_run(route, monkeypatch):
  monkeypatch.chdir(helpers.REPO)
  gin.clear_config()
  model = 'models/decoder_tiny.gin' if 'choice' in route else 'models/tiny.gin'
  files = [route] if route.startswith('quickstart') else [model, 'runs/finetune.gin', route]
  bindings = ['INIT_CHECKPOINT = "/tmp/init"', 'MODEL_DIR = "/tmp/ft"', 'TRAIN_STEPS = 10']
  if 'MIXTURE_OR_TASK_NAME' not in ''.join(open(f'gin_configs/{f}').read() for f in files
                                          if f.startswith(('finetune/glue', 'finetune/super',
                                                           'quickstart'))):
    task, lengths = (('pdtext_last_word_choices', "{'targets': 64}") if 'choice' in route else
                     ('pdtext_continuation_cls', "{'inputs': 64}") if 'classif' in route else
                     ('pdtext_continuation', "{'inputs': 64, 'targets': 4}"))
    bindings += [f'MIXTURE_OR_TASK_NAME = "{task}"', f'TASK_FEATURE_LENGTHS = {lengths}']
  gin_utils.parse_with_tasks(gin_utils.GinFlags(files=files, bindings=bindings))
  config = gin_utils.call(training.RunConfig)
  objective = config.curriculum.stages[0].objective
  assert HEADS[downstream_eval.prediction_kind(objective)] in objective.__mro__
  assert config.data.mixture_or_task_name in seqio.TaskRegistry.names()
  assert config.init_params.prefixes == {'model': 'model'}
  gin_utils.call(downstream_hook.DownstreamEval)
