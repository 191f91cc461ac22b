"""Our own Flax modules for Stable Diffusion 1.x: the CLIP text (and vision) transformer, the UNet and the VAE.

They know nothing of APL. Their param trees carry the names diffusers' and transformers' former Flax
classes gave them, so saved msgpack weights keep loading and convert.pt_name maps every param to its
PyTorch state-dict name (docs/design.md, "Model code").
"""
