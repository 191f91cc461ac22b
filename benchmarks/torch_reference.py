"""The PyTorch reference APL step: what the official train.py does per example, with diffusers' UNet.

Three UNet passes (neutral and frozen-private without grad, private with grad) and
backward through the prompt embeddings only. The prefix is inserted like the official
EmbeddingManager: the placeholder's token-embedding row is replaced by the K prefix
rows, the rest shifted right and truncated, before position embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel
from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask


class ReferenceStep:
    def __init__(self, folder: Path, num_vectors: int, placeholder_id: int, lr: float, eta: float,
                 device: str, dtype: torch.dtype):
        self.device, self.dtype, self.eta, self.placeholder_id = device, dtype, eta, placeholder_id
        load = dict(torch_dtype=dtype)
        self.text = CLIPTextModel.from_pretrained(folder / "text_encoder", **load).to(device).requires_grad_(False)
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet", **load).to(device).requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(folder / "vae", **load).to(device).requires_grad_(False)
        self.scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        width = self.text.config.hidden_size
        # fp32 prefix as the official code, cast when inserted
        self.prefix = torch.nn.Parameter(torch.rand(num_vectors, width, device=device))
        self.optimizer = torch.optim.Adam([self.prefix], lr=lr)

    def encode(self, ids: torch.Tensor, with_prefix: bool) -> torch.Tensor:
        model = getattr(self.text, "text_model", self.text)  # transformers 5 dropped the text_model wrapper
        embedded = model.embeddings.token_embedding(ids)
        if with_prefix:
            rows = []
            for row_ids, row in zip(ids, embedded):
                for col in reversed(torch.nonzero(row_ids == self.placeholder_id).flatten().tolist()):
                    row = torch.cat([row[:col], self.prefix.to(row.dtype), row[col + 1 :]])[: ids.shape[1]]
                rows.append(row)
            embedded = torch.stack(rows)
        hidden = model.embeddings(inputs_embeds=embedded)
        mask = _create_4d_causal_attention_mask(ids.shape, hidden.dtype, device=hidden.device)
        # as attention_mask: transformers 5's encoder no longer takes causal_attention_mask (it would ignore it)
        hidden = model.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        return model.final_layer_norm(hidden)

    def loss(self, z_t: torch.Tensor, t: torch.Tensor, private_ids: torch.Tensor, neutral_ids: torch.Tensor) -> torch.Tensor:
        """The APL loss at noisy latents z_t and timesteps t (tests/test_nn.py compares ours with it)."""
        with torch.no_grad():
            e_neutral = self.unet(z_t, t, self.encode(neutral_ids, False)).sample
            e_private_frozen = self.unet(z_t, t, self.encode(private_ids, True)).sample
        e_private = self.unet(z_t, t, self.encode(private_ids, True)).sample
        target = e_neutral - self.eta * (e_private_frozen - e_neutral)
        return torch.nn.functional.mse_loss(e_private.float(), target.float())

    def __call__(self, pixels: torch.Tensor, private_ids: torch.Tensor, neutral_ids: torch.Tensor) -> float:
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (pixels.shape[0],), device=self.device)
            z_t = self.scheduler.add_noise(latents, torch.randn_like(latents), t)
        loss = self.loss(z_t, t, private_ids, neutral_ids)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()
