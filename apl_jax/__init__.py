"""apl-jax: Anonymization Prompt Learning for Stable Diffusion in JAX/Flax."""

from diffusers.utils import logging as _diffusers_logging
from transformers.utils import logging as _transformers_logging

# We pin the last diffusers/transformers releases with Flax on purpose; their
# per-object deprecation warnings would drown every log line we print.
_diffusers_logging.set_verbosity_error()
_transformers_logging.set_verbosity_error()
