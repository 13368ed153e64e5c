r"""Clusters a vocabulary for C-RTS from the corpus' co-occurrence statistics.

C-RTS (Di Liello et al. 2022) replaces a token by one drawn from a cluster of
related tokens. This script makes that clustering without any external model,
with NumPy only, deterministically (fixed seeds):

1. Tokenise the corpus (one document per line) with the SentencePiece model.
2. Count co-occurrences of regular ids within a symmetric window of
   ``window`` tokens on each side (weight 1 per pair, inside a document).
3. Positive pointwise mutual information with context-distribution smoothing
   (``alpha = 0.75``, Levy et al. 2015): ``max(0, log p(w, c) / (p(w) p_α(c)))``.
4. A rank-``dim`` truncated SVD of the PPMI matrix (randomized, seed ``seed``,
   4 power iterations); token vectors ``U sqrt(S)``, scaled to unit length.
5. Spherical k-means (k-means++ start, seed ``seed``, Lloyd iterations until
   no token moves); an emptied cluster takes the token farthest from its
   centroid, so every cluster keeps at least one token.
6. Clusters are renumbered by their smallest id, so the file is canonical.

Regular ids that never occur in the corpus have no statistics; they are dealt
out round-robin over the clusters (in id order), so they stay drawable without
being lumped into one cluster.

Special ids (pad, EOS, UNK, the sentinels) get ``-1``. The output is a text
file with one integer per vocabulary id (line ``i`` is the cluster of id
``i``), ``vocab_size`` lines, sentinels included::

    python -m tasks.build_clusters            # tasks/data/pdtext.clusters.txt
    python -m tasks.build_clusters --num_clusters 100 --dim 64 --window 2
"""

import argparse
import gzip
from typing import Iterable, List, Optional

import numpy as np
import seqio
import sentencepiece as spm

from tasks import vocab as vocab_lib

CLUSTERS_NAME = 'pdtext.clusters.txt'
PDTEXT_CLUSTERS_PATH = f'{vocab_lib.DATA_DIR}/{CLUSTERS_NAME}'
PDTEXT_TRAIN_PATH = f'{vocab_lib.DATA_DIR}/pdtext.train.txt.gz'
NUM_CLUSTERS = 100


def read_documents(path: str, max_documents: Optional[int] = None) -> List[str]:
  """Non-blank lines of a (gzipped) text file, at most ``max_documents``."""
  opener = gzip.open if path.endswith('.gz') else open
  documents = []
  with opener(path, 'rt', encoding='utf-8') as f:
    for line in f:
      if line.strip():
        documents.append(line.rstrip('\n'))
        if max_documents is not None and len(documents) >= max_documents:
          break
  return documents


def cooccurrences(documents: Iterable[List[int]], num_ids: int, window: int) -> np.ndarray:
  """``[num_ids, num_ids]`` float64 symmetric counts of ids within ``window`` positions.

  Every id of ``documents`` must be below ``num_ids``; callers drop special ids
  first (a dropped id still occupies its position, so distances are real).
  Negative ids mark dropped positions.
  """
  pairs = []
  for ids in documents:
    ids = np.asarray(ids, np.int64)
    for offset in range(1, window + 1):
      left, right = ids[:-offset], ids[offset:]
      keep = (left >= 0) & (right >= 0)
      pairs.append(left[keep] * num_ids + right[keep])
  counts = np.bincount(np.concatenate(pairs or [np.zeros(0, np.int64)]),
                       minlength=num_ids * num_ids).astype(np.float64)
  counts = counts.reshape(num_ids, num_ids)
  return counts + counts.T


def ppmi(counts: np.ndarray, alpha: float = 0.75) -> np.ndarray:
  """Positive PMI with context-distribution smoothing; zero rows stay zero."""
  total = counts.sum()
  word = counts.sum(axis=1)
  context = counts.sum(axis=0) ** alpha
  context = context / max(context.sum(), 1e-300)
  with np.errstate(divide='ignore', invalid='ignore'):
    pmi = np.log(counts / total / np.outer(word / total, context))
  return np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0)


def truncated_svd_vectors(matrix: np.ndarray, dim: int, seed: int,
                          power_iterations: int = 4) -> np.ndarray:
  """Randomized rank-``dim`` SVD (Halko et al. 2011); rows ``U sqrt(S)`` at unit length."""
  rng = np.random.RandomState(seed)
  sketch = matrix @ rng.standard_normal((matrix.shape[1], dim + 10))
  basis, _ = np.linalg.qr(sketch)
  for _ in range(power_iterations):
    basis, _ = np.linalg.qr(matrix.T @ basis)
    basis, _ = np.linalg.qr(matrix @ basis)
  u_small, singular, _ = np.linalg.svd(basis.T @ matrix, full_matrices=False)
  vectors = (basis @ u_small)[:, :dim] * np.sqrt(singular[:dim])
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  return vectors / np.maximum(norms, 1e-12)


def spherical_kmeans(vectors: np.ndarray, num_clusters: int, seed: int,
                     max_iterations: int = 100) -> np.ndarray:
  """Cluster labels ``[n]`` in ``[0, num_clusters)``, every cluster non-empty."""
  n = len(vectors)
  if n < num_clusters:
    raise ValueError(f'{n} vectors cannot fill {num_clusters} clusters')
  rng = np.random.RandomState(seed)
  centroids = [vectors[rng.randint(n)]]
  distance = 1.0 - vectors @ centroids[0]
  for _ in range(num_clusters - 1):  # k-means++ on cosine distance
    weights = np.maximum(distance, 0.0)
    probabilities = weights / weights.sum() if weights.sum() > 0 else np.full(n, 1.0 / n)
    centroids.append(vectors[rng.choice(n, p=probabilities)])
    distance = np.minimum(distance, 1.0 - vectors @ centroids[-1])
  centroids = np.stack(centroids)
  labels = np.full(n, -1)
  for _ in range(max_iterations):
    similarity = vectors @ centroids.T  # [n, clusters]
    new_labels = np.argmax(similarity, axis=1)
    for cluster in range(num_clusters):  # refill emptied clusters
      if not np.any(new_labels == cluster):
        fit = similarity[np.arange(n), new_labels]
        sizes = np.bincount(new_labels, minlength=num_clusters)
        fit = np.where(sizes[new_labels] > 1, fit, np.inf)  # never empty another
        new_labels[np.argmin(fit)] = cluster
    if np.array_equal(new_labels, labels):
      break
    labels = new_labels
    sums = np.zeros_like(centroids)
    np.add.at(sums, labels, vectors)
    centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
  return labels


def build(documents: List[str], sentencepiece_path: str, num_clusters: int = NUM_CLUSTERS,
          dim: int = 64, window: int = 2, seed: int = 0) -> np.ndarray:
  """Cluster id of every vocabulary id (sentinels included), ``-1`` for special ids.

  Args:
    documents: the corpus, one string per document.
    sentencepiece_path: the SentencePiece model (100 sentinels are added).
    num_clusters: number of clusters of regular ids.
    dim: dimension of the SVD token vectors.
    window: co-occurrence window on each side.
    seed: seed of the SVD sketch and of k-means++.

  Returns:
    ``[vocab_size]`` int64 labels.
  """
  vocabulary = seqio.SentencePieceVocabulary(sentencepiece_path, vocab_lib.NUM_SENTINELS)
  info = vocab_lib.vocab_info(vocabulary)
  num_pieces = info.first_sentinel_id
  regular = ~np.asarray(info.is_special(np.arange(num_pieces)))
  encoded = spm.SentencePieceProcessor(model_file=sentencepiece_path).encode(documents)
  encoded = [np.where(regular[np.asarray(ids, np.int64)], ids, -1) for ids in encoded]
  counts = cooccurrences(encoded, num_pieces, window)
  regular_ids = np.flatnonzero(regular)
  seen = regular_ids[counts[regular_ids].sum(axis=1) > 0]
  unseen = np.setdiff1d(regular_ids, seen)
  vectors = truncated_svd_vectors(ppmi(counts[np.ix_(seen, seen)]), dim, seed)
  labels = np.full(info.vocab_size, -1, np.int64)
  labels[seen] = spherical_kmeans(vectors, num_clusters, seed)
  labels[unseen] = np.arange(len(unseen)) % num_clusters
  # Canonical numbering: clusters ordered by their smallest id.
  first_ids = [np.flatnonzero(labels == c)[0] for c in range(num_clusters)]
  renumber = np.empty(num_clusters, np.int64)
  renumber[np.argsort(first_ids)] = np.arange(num_clusters)
  return np.where(labels >= 0, renumber[np.maximum(labels, 0)], -1)


def write(labels: np.ndarray, path: str) -> None:
  """One integer per line: line ``i`` is the cluster of id ``i``."""
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(str(int(label)) for label in labels) + '\n')


def read(path: str) -> np.ndarray:
  """The labels written by ``write``: ``[vocab_size]`` int64."""
  with open(path, encoding='utf-8') as f:
    return np.array([int(line) for line in f if line.strip()], np.int64)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--corpus', default=PDTEXT_TRAIN_PATH)
  parser.add_argument('--sentencepiece_model', default=vocab_lib.PDTEXT_MODEL_PATH)
  parser.add_argument('--out', default=PDTEXT_CLUSTERS_PATH)
  parser.add_argument('--num_clusters', type=int, default=NUM_CLUSTERS)
  parser.add_argument('--dim', type=int, default=64)
  parser.add_argument('--window', type=int, default=2)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--max_documents', type=int, default=None)
  args = parser.parse_args(argv)
  labels = build(read_documents(args.corpus, args.max_documents), args.sentencepiece_model,
                 args.num_clusters, args.dim, args.window, args.seed)
  write(labels, args.out)
  sizes = np.bincount(labels[labels >= 0], minlength=args.num_clusters)
  print(f'wrote {args.out}: {len(labels)} ids, {args.num_clusters} clusters of '
        f'{sizes.min()}..{sizes.max()} ids')


if __name__ == '__main__':
  main()
