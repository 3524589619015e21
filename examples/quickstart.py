"""Pixel-level supervised contrast on a batch of feature maps, through the memory-lean core.

    python examples/quickstart.py

Every pixel is an anchor: 4 images of 48x48 pixels are 9,216 embeddings, whose dense
similarity matrix would be 9,216^2 floats; the chunked backend never holds more than a block.
"""

import torch

from contrastkit import info_nce

torch.manual_seed(0)
features = torch.randn(4, 32, 48, 48, requires_grad=True)  # (B, C, H, W), e.g. a decoder's output
labels = torch.randint(0, 4, (4, 48, 48))  # ground-truth or pseudo-label per pixel
labels[:, :8] = -1  # ignored pixels (ignore_index=-1)

loss = info_nce(features, labels=labels, temperature=0.1, backend="torch")
loss.backward()
dense_mib = (labels.numel() ** 2) * 4 / 2**20
print(f"pixel contrast over {labels.numel()} pixels: loss {loss.item():.4f}, "
      f"gradient norm {features.grad.norm():.4f}; the dense similarity matrix alone would take {dense_mib:.0f} MiB")
