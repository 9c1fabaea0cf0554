"""transfusion_mot: Transfusion-style text+image training on a Mixture-of-Transformers backbone."""

__version__ = "0.1.0"


def from_pretrained(run_dir, device=None, dtype=None):
    """Load a trained run (``run_dir`` or its ``model/`` folder) for generation on ``device`` (default: CUDA
    when present) in ``dtype`` (default: bf16 on CUDA, fp32 on CPU): see ``pretrained.py``."""
    from .pretrained import from_pretrained as load

    return load(run_dir, device, dtype)
