"""The cfgdiff U-Net written again in PyTorch (eager, NCHW), reading the Flax parameters.

An independent implementation of the same network: tests check the Flax model against
it, and benchmarks/guided_eval_torch.py times guided evaluation in both frameworks on
identical weights. Walks the Flax parameter tree in the order the Flax module creates
its submodules (ResBlock_0, ResBlock_1, ..., AttentionBlock_0, ...).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _t(array) -> torch.Tensor:
  return torch.from_numpy(np.asarray(array, np.float32).copy())


def _groups(channels: int) -> int:
  return math.gcd(channels, 32)


class TorchUNet:
  """eps(z [B,C,H,W], logsnr [B], label [B]) with the weights of a Flax `UNet`."""

  def __init__(self, params: dict, ch: int, ch_mult, num_res_blocks: int, attn_resolutions,
               head_channels: int, num_heads: int):
    self.p = _to_torch(params)
    self.ch, self.ch_mult, self.num_res_blocks = ch, tuple(ch_mult), num_res_blocks
    self.attn_resolutions = tuple(attn_resolutions)
    self.head_channels, self.num_heads = head_channels, num_heads

  # -- layers -------------------------------------------------------------------------
  @staticmethod
  def _dense(x, p):
    return x @ p["kernel"] + p["bias"]

  @staticmethod
  def _conv(x, p):
    kernel = p["kernel"]  # OIHW after conversion
    return F.conv2d(x, kernel, p["bias"], padding=kernel.shape[-1] // 2)

  @staticmethod
  def _norm(x, p):
    return F.group_norm(x, _groups(x.shape[1]), p["scale"], p["bias"], eps=1e-6)

  def _resblock(self, x, emb, p, resample=None):
    h = F.silu(self._norm(x, p["GroupNorm_0"]))
    if resample == "down":
      h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    elif resample == "up":
      h = F.interpolate(h, scale_factor=2, mode="nearest")
      x = F.interpolate(x, scale_factor=2, mode="nearest")
    h = self._conv(h, p["Conv_0"])
    scale, shift = self._dense(F.silu(emb), p["Dense_0"])[:, :, None, None].chunk(2, dim=1)
    h = self._norm(h, p["GroupNorm_1"]) * (1 + scale) + shift
    h = self._conv(F.silu(h), p["Conv_1"])
    if "Conv_2" in p:
      x = self._conv(x, p["Conv_2"])
    return x + h

  def _attention(self, x, p):
    b, c, hgt, wid = x.shape
    y = self._norm(x, p["GroupNorm_0"]).reshape(b, c, hgt * wid).transpose(1, 2)
    qkv = torch.einsum("bnc,cthd->tbhnd", y, p["DenseGeneral_0"]["kernel"])
    qkv = qkv + p["DenseGeneral_0"]["bias"][:, None, :, None, :]
    y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [b, heads, n, d]
    y = torch.einsum("bhnd,hdc->bnc", y, p["DenseGeneral_1"]["kernel"])
    y = y + p["DenseGeneral_1"]["bias"]
    return x + y.transpose(1, 2).reshape(b, c, hgt, wid)

  # -- network ------------------------------------------------------------------------
  def __call__(self, z: torch.Tensor, logsnr: torch.Tensor, label: torch.Tensor):
    p, counters = self.p, {"ResBlock": 0, "AttentionBlock": 0}

    def take(kind):
      name = f"{kind}_{counters[kind]}"
      counters[kind] += 1
      return p[name]

    t = torch.arctan(torch.exp(-0.5 * logsnr.clamp(-20, 20))) / (0.5 * math.pi)
    half = self.ch // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = 1000.0 * t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = self._dense(F.silu(self._dense(emb, p["Dense_0"])), p["Dense_1"])
    emb = emb + p["class_embed"]["embedding"][label]

    block = lambda h, resample=None: self._resblock(h, emb, take("ResBlock"), resample)

    def maybe_attend(h):
      return self._attention(h, take("AttentionBlock")) if h.shape[2] in self.attn_resolutions \
          else h

    h = self._conv(z, p["Conv_0"])
    skips = [h]
    for level, _ in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = maybe_attend(block(h))
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = block(h, "down")
        skips.append(h)
    h = block(h)
    h = self._attention(h, take("AttentionBlock"))
    h = block(h)
    for level, _ in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = maybe_attend(block(torch.cat([h, skips.pop()], dim=1)))
      if level != 0:
        h = block(h, "up")
    h = F.silu(self._norm(h, p["GroupNorm_0"]))
    return self._conv(h, p["Conv_1"])


def _to_torch(tree: dict, module: str = "") -> dict:
  """Flax arrays to torch tensors; conv kernels HWIO -> OIHW."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out[key] = _to_torch(value, key)
    elif key == "kernel" and module.startswith("Conv"):
      out[key] = _t(value).permute(3, 2, 0, 1).contiguous()
    else:
      out[key] = _t(value)
  return out


def guided_eps(net: TorchUNet, z, logsnr, label, w, null_label: int, fused: bool):
  """(1 + w) eps(z, c) - w eps(z, null), as one 2B batch or two B batches."""
  null = torch.full_like(label, null_label)
  if fused:
    both = net(torch.cat([z, z]), torch.cat([logsnr, logsnr]), torch.cat([label, null]))
    cond, uncond = both.chunk(2)
  else:
    cond, uncond = net(z, logsnr, label), net(z, logsnr, null)
  w = w[:, None, None, None]
  return (1 + w) * cond - w * uncond


def adam_train_step(net: TorchUNet, batch_size: int, image_shape, num_classes: int,
                    p_uncond: float = 0.2, learning_rate: float = 1e-4, seed: int = 0):
  """A closure running one training step of the paper's loss on a fixed batch, in eager
  PyTorch with Adam: noise at a uniform log-SNR in [-10, 10], label dropped to the null
  token with probability ``p_uncond``, eps-prediction MSE, backward, update."""
  leaves = []

  def collect(tree):
    for value in tree.values():
      if isinstance(value, dict):
        collect(value)
      else:
        leaves.append(value.requires_grad_(True))

  collect(net.p)
  optimizer = torch.optim.Adam(leaves, lr=learning_rate)
  generator = torch.Generator().manual_seed(seed)
  x = torch.rand((batch_size,) + tuple(image_shape), generator=generator) * 2 - 1
  y = torch.randint(0, num_classes, (batch_size,), generator=generator)

  def step() -> float:
    logsnr = torch.rand(batch_size, generator=generator) * 20 - 10
    alpha = torch.sigmoid(logsnr).sqrt()[:, None, None, None]
    sigma = torch.sigmoid(-logsnr).sqrt()[:, None, None, None]
    eps = torch.randn(x.shape, generator=generator)
    drop = torch.rand(batch_size, generator=generator) < p_uncond
    label = torch.where(drop, torch.full_like(y, num_classes), y)
    loss = torch.mean(torch.square(net(alpha * x + sigma * eps, logsnr, label) - eps))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())

  return step
