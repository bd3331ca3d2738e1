"""Training: run configs, the trainer loop, checkpoints and the run folder's layout.

``load_config(path, overrides)`` reads and validates a YAML run config into a :class:`RunConfig`;
``train(config)`` runs it (one process or under ``torchrun``) and writes the run folder that
:class:`RunDir` describes.
"""

from mmtard.train.config import RunConfig
from mmtard.train.config_io import load_config, save_config
from mmtard.train.rundir import RunDir
from mmtard.train.trainer import train

__all__ = ["RunConfig", "RunDir", "load_config", "save_config", "train"]
