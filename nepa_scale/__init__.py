"""nepa-scale: scaling studies of NEPA vision pretraining."""

__version__ = "0.1.0"
