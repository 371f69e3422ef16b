"""Binarized pixels: each pixel on with probability grey / 255, drawn from a counter-based hash instead of a random
generator's stream.

A pixel's uniform number is a function of (seed, draw, image index, pixel index) only: an image gets the same
pixels whichever batch it is in, however a batch is split across processes, on the CPU or a GPU, and after a
resume. `draw` is the epoch for data.binarize=dynamic (a new binarization each epoch), a fixed number for static
and for the test set. Everything is integer arithmetic on tensors that wraps around, so CPU and CUDA give the same
bits, and the training step can call it inside a captured CUDA graph: no host reads, no branching on tensor
values, no torch.Generator.

Each image's key is 64-bit (splitmix64's mixing of seed, draw and index: no two images of a dataset share one in
practice); each pixel's number is 32-bit (lowbias32, a 32-bit mixer, over a Weyl sequence from that key), because
int32 arithmetic is several times faster than int64 on CPUs without 64-bit vector multiplies, and the step pays it
on every pixel of every batch.
"""

from __future__ import annotations

import torch

# splitmix64's constants (Steele, Lea and Flood, 2014) and lowbias32's (C. Wellons' integer hash prospector), as
# the signed values of the same bits: torch's integers are signed, and their arithmetic wraps like unsigned.
_GOLDEN64 = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX64 = (0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64))
_GOLDEN32 = 0x9E3779B9 - (1 << 32)
_MIX32 = (0x7FEB352D, 0x846CA68B - (1 << 32))
# Uniform numbers on a grid of 2**-23, far finer than the grey levels' 1/255; 23 bits, because then
# u * 255 < grey * 2**23 is compared exactly in int32 (255 * 2**23 < 2**31).
UNIFORM_BITS = 23
_IMAGES_PER_CHUNK = 4096  # binarize_images: bounds the temporaries (a few 4-byte words per pixel)

# The fixed draws: data.binarize=static binarizes the training set once with (STATIC_SEED, STATIC_DRAW); with
# dynamic or static, the test set is binarized once with (STATIC_SEED, TEST_DRAW), so every run scores the same
# images. Dynamic draws are epochs (>= 0) under the run's own seed, never these negative draws.
STATIC_SEED = 20131220  # the day Kingma and Welling's paper appeared
STATIC_DRAW = -1
TEST_DRAW = -2


def _shift_right(z: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """A logical shift of a `width`-bit word (torch's >> on signed integers copies the sign bit in)."""
    return (z >> bits) & ((1 << (width - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: a bijection of 64-bit words in which every output bit depends on every input bit."""
    z = (z ^ _shift_right(z, 30, 64)) * _MIX64[0]
    z = (z ^ _shift_right(z, 27, 64)) * _MIX64[1]
    return z ^ _shift_right(z, 31, 64)


def _mix32_(z: torch.Tensor) -> torch.Tensor:
    """lowbias32, in place (the [B, D] words are temporaries of the caller's)."""
    z ^= _shift_right(z, 16, 32)
    z *= _MIX32[0]
    z ^= _shift_right(z, 15, 32)
    z *= _MIX32[1]
    z ^= _shift_right(z, 16, 32)
    return z


def _signed64(value: int) -> int:
    """A Python int as the int64 of its low 64 bits: any seed is accepted."""
    return ((value + (1 << 63)) % (1 << 64)) - (1 << 63)


def pixel_uniforms(indices: torch.Tensor, pixels: int, draw, seed: int) -> torch.Tensor:
    """int32 [B, pixels] in [0, 2**23): pixel j of image indices[b] as a uniform integer, a function of (seed,
    draw, indices[b], j) only. draw: an int, or a 0-dim int64 tensor on indices' device (never read on the host)."""
    key = _mix64(indices.to(torch.int64) * _GOLDEN64 + _signed64(seed))  # per image...
    key = _mix64(_mix64(key ^ draw) + _GOLDEN64)  # ...and per draw
    key = (key >> 32).to(torch.int32)  # its high half: the best mixed bits
    steps = torch.arange(1, pixels + 1, dtype=torch.int32, device=indices.device) * _GOLDEN32
    return _shift_right(_mix32_(key[:, None] + steps), 32 - UNIFORM_BITS, 32)


def bernoulli_pixels(images: torch.Tensor, indices: torch.Tensor, draw, seed: int) -> torch.Tensor:
    """uint8 [B, D] grey levels -> float32 [B, D] in {0., 1.}: pixel on iff u < grey / 255, u being its uniform
    number (pixel_uniforms / 2**23), compared exactly in integers. indices: int64 [B], each image's index in its
    dataset; draw: the epoch (dynamic) or a fixed number, an int or a 0-dim int64 tensor on the images' device."""
    uniforms = pixel_uniforms(indices, images.shape[-1], draw, seed)
    return (uniforms.mul_(255) < images.to(torch.int32) << UNIFORM_BITS).to(torch.float32)


def binarize_images(images: torch.Tensor, seed: int, draw: int) -> torch.Tensor:
    """A whole uint8 dataset [N, D] binarized once (static, and the test set) as uint8 in {0, 255}: still grey
    levels, which to_unit_float turns into {0., 1.}. Image i gets the pixels bernoulli_pixels gives it as index i;
    in chunks, so that 60,000 images need no gigabyte of temporaries."""
    out = torch.empty_like(images)
    for start in range(0, len(images), _IMAGES_PER_CHUNK):
        chunk = images[start: start + _IMAGES_PER_CHUNK]
        indices = torch.arange(start, start + len(chunk), device=images.device)
        out[start: start + len(chunk)] = bernoulli_pixels(chunk, indices, draw, seed).to(torch.uint8).mul_(255)
    return out
