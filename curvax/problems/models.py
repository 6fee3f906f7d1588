"""Flax linen versions of the papers' models."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """Dense layers with ``activation`` between them; the last layer is linear (logits)."""
  features: Sequence[int] = (1000, 500, 250, 10)
  activation: Callable[[jax.Array], jax.Array] = jnp.tanh

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.features):
      x = nn.Dense(width)(x)
      if i < len(self.features) - 1:
        x = self.activation(x)
    return x


class BasicCNN(nn.Module):
  """CurveBall's basic CNN (curveball.md §5.2, footnote 4).

  5×5 convolutions with 32, 32, 64, 64, 10 channels, ReLU, and 3×3 max-pooling with stride
  2 after each of the first three. The last convolution is the classifier; its map is
  averaged over space to give logits. ``use_batchnorm`` adds BatchNorm after every
  convolution but the last; call with ``train=True`` and ``mutable=['batch_stats']``
  while training.
  """
  num_classes: int = 10
  use_batchnorm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, channels in enumerate((32, 32, 64, 64)):
      x = nn.Conv(channels, (5, 5), padding="SAME")(x)
      if self.use_batchnorm:
        x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.relu(x)
      if i < 3:
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    x = nn.Conv(self.num_classes, (5, 5), padding="SAME")(x)
    return jnp.mean(x, axis=(1, 2))


class LeNet(nn.Module):
  """LeNet of the comparison paper (second_order_comparison.md §3): 20 and 50 5×5
  filters, 2×2 max-pooling, a 500-unit dense layer, tanh throughout."""
  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = jnp.tanh

  @nn.compact
  def __call__(self, x):
    for channels in (20, 50):
      x = self.activation(nn.Conv(channels, (5, 5), padding="VALID")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = self.activation(nn.Dense(500)(x))
    return nn.Dense(self.num_classes)(x)


class Autoencoder(nn.Module):
  """Deep autoencoder D-1000-500-250-30-250-500-1000-D (kfra_kflr.md §5).

  Encoder widths ``hidden`` end in a linear code layer; the decoder mirrors them. Outputs
  are logits of Bernoulli means (pair with ``sigmoid_binary_cross_entropy``).
  """
  output_dim: int = 784
  hidden: Sequence[int] = (1000, 500, 250, 30)
  activation: Callable[[jax.Array], jax.Array] = nn.sigmoid

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    *encoder, code = self.hidden
    widths = [*encoder, code, *reversed(encoder), self.output_dim]
    for i, width in enumerate(widths):
      x = nn.Dense(width)(x)
      is_code, is_output = i == len(encoder), i == len(widths) - 1
      if not (is_code or is_output):
        x = self.activation(x)
    return x


class Transformer(nn.Module):
  """A causal, decoder-only transformer language model (pre-LayerNorm blocks).

  Token and learned position embeddings (``nn.Embed``), ``num_blocks`` blocks of causal
  ``nn.MultiHeadDotProductAttention`` and a GELU MLP (4× wide), each behind a LayerNorm
  and added back to the residual stream, a final LayerNorm and a Dense read-out to
  ``vocab_size`` logits per position. Input: integer tokens ``(batch, positions)``;
  output: logits ``(batch, positions, vocab_size)``.
  """
  vocab_size: int = 128
  width: int = 128
  num_heads: int = 4
  num_blocks: int = 2
  context: int = 128

  @nn.compact
  def __call__(self, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
    x = (nn.Embed(self.vocab_size, self.width, name="tokens")(tokens)
         + nn.Embed(self.context, self.width, name="positions")(positions))
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.num_blocks):
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(
          nn.LayerNorm()(x), mask=mask)
      h = nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(x)))
      x = x + nn.Dense(self.width)(h)
    return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))
