"""Write an official DiT state dict (facebookresearch/DiT `models.py` key names) in diffusers'
DiTTransformer2DModel layout. The key names on both sides were read from the two model definitions; the
mapping is written here, independently of diffusers' conversion script, so a test that compares the two
models' features checks the mapping and our diffusers family at once."""
from __future__ import annotations

import torch
from torch import Tensor


def dit_to_diffusers(sd: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = d + "norm1.emb."                      # diffusers keeps a copy of the t / y embedders in every block
        for p in ("weight", "bias"):
            out[emb + f"timestep_embedder.linear_1.{p}"] = sd[f"t_embedder.mlp.0.{p}"]
            out[emb + f"timestep_embedder.linear_2.{p}"] = sd[f"t_embedder.mlp.2.{p}"]
            out[d + f"norm1.linear.{p}"] = sd[b + f"adaLN_modulation.1.{p}"]
            q, k, v = sd[b + f"attn.qkv.{p}"].chunk(3)
            out[d + f"attn1.to_q.{p}"], out[d + f"attn1.to_k.{p}"], out[d + f"attn1.to_v.{p}"] = q, k, v
            out[d + f"attn1.to_out.0.{p}"] = sd[b + f"attn.proj.{p}"]
            out[d + f"ff.net.0.proj.{p}"] = sd[b + f"mlp.fc1.{p}"]
            out[d + f"ff.net.2.{p}"] = sd[b + f"mlp.fc2.{p}"]
        out[emb + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def save_diffusers_folder(model: torch.nn.Module, folder) -> None:
    """save_pretrained in safetensors form (config.json + diffusion_pytorch_model.safetensors)."""
    model.save_pretrained(folder, safe_serialization=True)
