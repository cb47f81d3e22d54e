"""Training a GAP + linear classifier on the user's own classes (``gapcam train``).

- ``data``: the image folder -> class names and a train/val split
- ``features``: pooled backbone features, computed once and cached on disk
- ``loop``: the linear head's training loop (standardised features, early stopping)
- ``finetune``: optionally, the backbone's last stage too, with augmentation
- ``output``: the run folder (safetensors + JSON, plots, overlays), written atomically
- ``config``: ``TrainConfig``, what a run is asked to do, and the defaults
- ``trainer``: ``run_training`` and ``train_classifier``, which drive the above
- ``synthetic``: shapes on clutter with their true boxes (``gapcam synth``)
"""

from gapcam.train.config import TrainConfig
from gapcam.train.output import TrainReport
from gapcam.train.trainer import run_training, train_classifier

__all__ = ["TrainConfig", "TrainReport", "run_training", "train_classifier"]
