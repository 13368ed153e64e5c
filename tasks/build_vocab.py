r"""Trains the shipped SentencePiece model of the ``pdtext`` corpus.

A unigram model of 3968 pieces with T5's special ids (pad 0, EOS 1, UNK 2, no
BOS) and byte fallback, trained on the train split only. With seqio's 100
sentinels the vocabulary has 4068 ids, the mask id is 4068, and a model
embedding of 4096 rows holds them all. Training is not bit-reproducible: a
rebuilt model is equivalent but may assign different ids::

    python -m tasks.build_vocab --out_dir tasks/data
"""

import argparse
import gzip
import os

import sentencepiece as spm

VOCAB_PIECES = 3968
MODEL_NAME = 'pdtext.model'


def train(corpus_path: str, model_path: str,
          vocab_pieces: int = VOCAB_PIECES) -> None:
  """Trains a SentencePiece model on a gzip text file, one document per line.

  Args:
    corpus_path: the ``*.txt.gz`` training text.
    model_path: where to write the ``.model`` file.
    vocab_pieces: number of pieces, special ids included.
  """
  with gzip.open(corpus_path, 'rt', encoding='utf-8') as f:
    sentences = (line.rstrip('\n') for line in f)
    model = os.path.splitext(model_path)[0]
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_prefix=model,
        model_type='unigram',
        vocab_size=vocab_pieces,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        max_sentence_length=20000,
        split_digits=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2)
  os.remove(model + '.vocab')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
  parser.add_argument('--corpus', default=os.path.join(
      data_dir, 'pdtext.train.txt.gz'))
  parser.add_argument('--out_dir', default=data_dir)
  args = parser.parse_args()
  train(args.corpus, os.path.join(args.out_dir, MODEL_NAME))


if __name__ == '__main__':
  main()
