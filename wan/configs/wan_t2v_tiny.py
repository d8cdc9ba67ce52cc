"""A tiny T2V config with the layout of the A14B one: the sizes of ../shared/golden/tiny_release.

Upstream hard-codes umT5-xxl and VAE sizes in code; a tiny release overrides them through the
`extensions` block (see `wan.configs.EXTENSION_DEFAULTS`).
"""

import torch
from easydict import EasyDict

from ..modules.t5 import T5Config
from ..modules.vae2_1 import VAEConfig
from .wan_t2v_A14B import t2v_A14B

t2v_tiny = EasyDict(t2v_A14B)
t2v_tiny.update(
    __name__="Config: Wan T2V tiny (test fixture)",
    text_len=32,
    frame_num=1,
    dim=64,
    ffn_dim=128,
    freq_dim=32,
    num_heads=4,
    num_layers=2,
    sample_steps=8,
    t5_dtype=torch.bfloat16,
    param_dtype=torch.bfloat16,
)
t2v_tiny.extensions = EasyDict(
    **T5Config(vocab=384, dim=4096, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2).extension_block(),
    **VAEConfig(dim=16).extension_block(),
    dit_model_type="t2v", dit_in_dim=16, dit_out_dim=16, dit_text_dim=4096, dit_text_len=32,
)
