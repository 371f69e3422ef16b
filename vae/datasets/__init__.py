"""The datasets data.name chooses, each in a module of its own: mnist.py, fashion_mnist.py, npz.py (your own
images). load_dataset fetches (if allowed), verifies and decodes one, binarized as data.binarize asks.

A dataset module provides three functions of the DataConfig:
    check(data, root_name)  cheap checks of its paths before any long work (root_name: data.root's name in messages)
    prepare(data, say)      fetch what is missing (when data.download allows) and verify it; `say` prints progress
    read(data)              the verified files decoded: an ImageData of uint8 grey levels
Adding a dataset is one such module and one entry in SOURCES (and its name in vae.config.DATASETS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from contextlib import AbstractContextManager

from ..config import DataConfig
from . import fashion_mnist, mnist, npz
from .base import DIGITS, DataError, ImageData, check_data_root
from .binarize import STATIC_DRAW, STATIC_SEED, TEST_DRAW, binarize_images

SOURCES: dict[str, types.ModuleType] = {
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "npz": npz,
}

__all__ = ["DIGITS", "SOURCES", "DataError", "ImageData", "check_data_root", "check_dataset_paths", "load_dataset"]


def check_dataset_paths(data: DataConfig, root_name: str = "data.root") -> None:
    """Before any long work: the data root is usable (mnist, fashion_mnist), the .npz files are files (npz).
    root_name: what the messages call the root (evaluate.py: --data-root)."""
    SOURCES[data.name].check(data, root_name)


def load_dataset(data: DataConfig, say=print, *, fetching: AbstractContextManager | None = None) -> ImageData:
    """The dataset data.name names: fetched (when data.download allows), verified, decoded; with data.binarize
    dynamic or static the test set binarized once with a fixed seed, with static the training set too.

    fetching: a context around the fetch and the verification only. With several processes, data.py passes
    accelerator.local_main_process_first(): the node's first process fetches and verifies, the others wait for
    it, then only verify; decoding and binarizing run in every process at once."""
    source = SOURCES[data.name]
    source.check(data)
    with fetching if fetching is not None else contextlib.nullcontext():
        source.prepare(data, say)
    return binarized(source.read(data), data.binarize)


def binarized(dataset: ImageData, mode: str) -> ImageData:
    """data.binarize applied to what is fixed for the run: none leaves the grey levels; dynamic binarizes the test
    set (the training step draws the training pixels each epoch); static the test set and the training set."""
    if mode == "none":
        return dataset
    test = binarize_images(dataset.test_images, STATIC_SEED, TEST_DRAW)
    train = binarize_images(dataset.train_images, STATIC_SEED, STATIC_DRAW) if mode == "static" \
        else dataset.train_images
    return dataclasses.replace(dataset, train_images=train, test_images=test)
