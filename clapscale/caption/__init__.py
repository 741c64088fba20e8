"""Synthetic captions from a tag-guided audio captioner (papers/clap-synthetic-captions-audioset.txt).

``config`` (the run config), ``model`` (``TagGuidedCaptioner``, ``CaptionVocab``, beam / greedy
``generate``), ``export`` (the ``runs/<name>/captioner`` directory), ``train`` (the distributed,
resumable trainer with checkpoint averaging), ``generate`` (a new shard set with synthetic captions),
``metrics`` (BLEU-4, ROUGE-L, tag recall), ``cli`` (``clapscale caption train|generate|score``).
"""
