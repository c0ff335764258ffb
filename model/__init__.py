"""The VDVAE model: presets, architecture, likelihood, official-checkpoint import.

Architecture only: no distributed code, no logging, no file formats beyond
`torch.load` of weights.
"""

from .likelihood import dmol_nll, dmol_sample, gaussian_kl
from .official import CheckpointMismatchError, load_official, official_state_dict
from .presets import PRESETS, ModelConfig, PaperTraining, Preset, get_preset
from .vdvae import VDVAE, ElboTerms, parse_checkpoint_policy

__all__ = [
    "VDVAE", "ElboTerms", "ModelConfig", "PaperTraining", "Preset", "PRESETS", "get_preset",
    "load_official", "official_state_dict", "CheckpointMismatchError", "dmol_nll",
    "dmol_sample", "gaussian_kl", "parse_checkpoint_policy",
]
