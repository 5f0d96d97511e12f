"""OpenVLA / OpenVLA-OFT from timm + transformers' Llama, no remote code (vla_spec)."""
