"""apl-jax: Anonymization Prompt Learning for Stable Diffusion in JAX/Flax."""

import os as _os

# diffusers and transformers log per-object notices (deprecations, unused config keys) that would
# drown every line we print. Both read these variables when they are first imported, in every
# release, so they need not be imported here; an explicit setting of the user's wins.
_os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
