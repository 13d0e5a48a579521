"""Small image classifiers for MNIST-5k and scikit-learn digits."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from peftjax.logical import param_init


def _dense(features: int, name: str, axes=('embed', 'mlp')) -> nn.Dense:
  return nn.Dense(features, name=name,
                  kernel_init=param_init(nn.initializers.lecun_normal(), axes),
                  bias_init=param_init(nn.initializers.zeros_init(), axes[1:]))


class MLP(nn.Module):
  """Flatten -> [Dense -> ReLU -> Dropout] x len(hidden) -> Dense classifier.

  >>> model = MLP(hidden=(64,), num_classes=10)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))  # doctest: +SKIP
  """
  hidden: Sequence[int] = (256, 128)
  num_classes: int = 10
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, image, deterministic: bool = True):
    x = image.reshape(image.shape[0], -1)
    for i, h in enumerate(self.hidden):
      x = nn.relu(_dense(h, f'dense_{i}')(x))
      x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return _dense(self.num_classes, 'classifier', ('mlp', 'classes'))(x)


class CNN(nn.Module):
  """Two 3x3 conv blocks with max-pooling, a dense layer and a classifier."""
  channels: Sequence[int] = (32, 64)
  hidden: int = 128
  num_classes: int = 10
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, image, deterministic: bool = True):
    x = image
    for i, c in enumerate(self.channels):
      x = nn.Conv(c, (3, 3), name=f'conv_{i}', kernel_init=param_init(
          nn.initializers.lecun_normal(), (None, None, 'conv_in', 'conv_out')),
                  bias_init=param_init(nn.initializers.zeros_init(),
                                                         ('conv_out',)))(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), (2, 2), padding='SAME')
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(_dense(self.hidden, 'dense_0')(x))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return _dense(self.num_classes, 'classifier', ('mlp', 'classes'))(x)
