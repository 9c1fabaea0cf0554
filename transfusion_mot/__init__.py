"""transfusion_mot: Transfusion-style text+image training on a Mixture-of-Transformers backbone."""

__version__ = "0.1.0"
