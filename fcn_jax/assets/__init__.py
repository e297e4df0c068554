"""Files shipped with the package: the net surgery tutorial's inputs and ImageNet's class names.

``tutorial_file(name)`` is the path of one of :data:`TUTORIAL_FILES`, so the tutorial runs
without Caffe's repository or this project's tests folder::

    import fcn_jax
    module, params = fcn_jax.load_caffe(fcn_jax.tutorial_file("deploy.prototxt"))
    image = fcn_jax.preprocess.load_image(fcn_jax.tutorial_file("cat.jpg"))

``imagenet_labels()`` gives the 1000 ILSVRC-2012 class names in the order of CaffeNet's
outputs (Caffe's ``data/ilsvrc12/synset_words.txt``: ``"n02123045 tabby, tabby cat"``).
No JAX is imported here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))

#: The tutorial's files (Caffe's ``examples/net_surgery`` and ``models/bvlc_reference_caffenet``)
#: and what each is.
TUTORIAL_FILES = {
    "conv.prototxt": "the single-convolution net of the designer-filter part (1x1x100x100 input)",
    "deploy.prototxt": "CaffeNet (bvlc_reference_caffenet) classifier, input 10x3x227x227",
    "bvlc_caffenet_full_conv.prototxt": "the fully convolutional CaffeNet, input 1x3x451x451",
    "cat.jpg": "the tutorial's cat photo, 360x480 RGB (its gray version: load_image(..., "
               "color=False))",
}
SYNSET_WORDS = "synset_words.txt"
#: Number of ImageNet (ILSVRC-2012) classes.
IMAGENET_CLASSES = 1000


def tutorial_file(name: str) -> str:
    """Path of a tutorial file shipped with the package (one of :data:`TUTORIAL_FILES`)."""
    if name not in TUTORIAL_FILES:
        raise FileNotFoundError(f"{name}: not a tutorial file; the package ships "
                                f"{', '.join(sorted(TUTORIAL_FILES))}")
    return os.path.join(_HERE, name)


@functools.lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[tuple[str, str], ...]:
    """The 1000 ``(wordnet id, words)`` pairs, in CaffeNet's class order."""
    with open(os.path.join(_HERE, SYNSET_WORDS), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split(" ", 1) for line in f if line.strip()]
    return tuple((r[0], r[1]) for r in rows)


def imagenet_labels(short: bool = False) -> tuple[str, ...]:
    """The 1000 ImageNet class names by class index: ``"tabby, tabby cat"`` (``short``: the
    first name only, ``"tabby"``)."""
    words = [w for _, w in imagenet_synsets()]
    return tuple(w.split(",")[0] for w in words) if short else tuple(words)


def default_labels(num_classes: int, short: bool = False) -> Sequence[str] | None:
    """ImageNet's class names for a net with 1000 outputs, else None."""
    return imagenet_labels(short) if num_classes == IMAGENET_CLASSES else None


__all__ = ["IMAGENET_CLASSES", "TUTORIAL_FILES", "default_labels", "imagenet_labels",
           "imagenet_synsets", "tutorial_file"]
