"""Training pipeline: run config, streaming, DeepSpeed training, evaluation, the `vdvae` command."""
