"""Unsupervised curation of audio-caption pairs with a teacher CLAP (papers/clap-unsupervised-curation-soft-labels.txt).

Three strategies make an Improvement-Set, each written as a new shard set (``clapscale curate``):

- **DU** (domain-unspecific): every clip of the wild-audio shards is matched against every caption of
  the caption pool (the teacher's training captions, de-duplicated); a (clip, caption) pair is kept
  when the teacher's cosine is >= sigma (paper: 0.7), at most ``top_k`` captions per clip.
- **DS** (domain-specific): the pool captions whose text embedding is close to a downstream label's
  prompt (cosine >= the DS threshold, optionally at most ``top_k`` captions per label) select the
  training pairs that carry them; the DS set is also the replay set of ADS students.
- **ADS** (augmented domain-specific): DS's caption subset aligned with the wild audio as in DU.

``similarity`` holds the chunked top-k (never an N x M matrix in memory), ``pool`` the caption pool
and the DS selection, ``run`` the distributed, resumable driver, ``cli`` the subcommand.
"""
