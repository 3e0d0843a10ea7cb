"""The flow timestep (sigma * 1000) reaches the transformer in float32 on every backend.

Single-process and DeepSpeed runs (bf16 autocast) feed the model fp32 timesteps, like SD3's
pipeline and ``framer-sr``; FSDP2's root mixed-precision policy must not cast them to bf16
(which rounds to a multiple of 4 above 512: 857.7 -> 856), while x_t and the embeddings
still run in bf16. One rank on gloo/CPU, the backend built exactly as the trainer builds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _parallel_launch import free_port
from _waiting import HANG_S

SCRIPT = r"""
import torch
from framer_dist.config import load_config
from framer_dist.models.dit4sr import apply_training_mode, build_model
from framer_dist.models.dit4sr.config import section
from framer_dist.parallel import setup_backend

cfg = load_config(None, ["parallel.backend='fsdp2'", "train.precision='bf16'",
                         "parallel.activation_checkpointing='all'"])
torch.manual_seed(0)
model = build_model(cfg.model)
params = apply_training_mode(model, cfg.train.mode, section(cfg).lora)
backend = setup_backend(cfg, model, params)
seen = []
model.time_text_embed.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
blocks_in = []
model.transformer_blocks[0].register_forward_pre_hook(
    lambda mod, args: blocks_in.append(args[0].dtype))
t = torch.tensor([857.7, 301.3])
with torch.no_grad(), backend.autocast():
    backend.model(hidden_states=torch.randn(2, 16, 8, 8), lr_latent=torch.randn(2, 16, 8, 8),
                  timestep=t, encoder_hidden_states=torch.randn(2, 5, 32),
                  pooled_projections=torch.randn(2, 32))
assert seen[0].dtype == torch.float32, seen[0].dtype
assert torch.equal(seen[0], t), seen[0].tolist()
assert blocks_in[0] == torch.bfloat16, blocks_in  # the blocks still compute in bf16
# and a bf16 training step (per-block readout, every block checkpointed) still runs
with backend.autocast():
    out = backend.model(hidden_states=torch.randn(2, 16, 8, 8), lr_latent=torch.randn(2, 16, 8, 8),
                        timestep=t, encoder_hidden_states=torch.randn(2, 5, 32),
                        pooled_projections=torch.randn(2, 32), readout="velocity")
loss = out.sample.float().pow(2).mean() + out.features.float().pow(2).mean()
backend.backward(loss)
backend.step()
assert seen[-1].dtype == torch.float32 and torch.isfinite(loss)
print("OK")
"""


def test_fsdp2_bf16_keeps_the_timestep_fp32(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root), env_pp] if (env_pp := os.environ.get(
                   "PYTHONPATH")) else [str(root)]))
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=HANG_S)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
