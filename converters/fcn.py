"""Moved: the net-definition rewrites live in ``fcn_jax.netdef`` (they need the layer table's
shape rules). This name stays for existing code; importing it imports JAX."""

from __future__ import annotations

from fcn_jax.netdef import (  # noqa: F401
    BatchNormFold,
    FcCast,
    FullyConvPlan,
    as_net,
    batchnorm_folds,
    blob_shapes,
    fold_batchnorm_net,
    fully_conv_plan,
    fully_convolutional_net,
    input_shapes,
)

__all__ = ["BatchNormFold", "FcCast", "FullyConvPlan", "as_net", "batchnorm_folds",
           "blob_shapes", "fold_batchnorm_net", "fully_conv_plan", "fully_convolutional_net",
           "input_shapes"]
