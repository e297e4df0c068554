"""Sub-commands of the ``fcn-jax`` CLI, one module per family (see ``fcn_jax.cli``)."""
