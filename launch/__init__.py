"""Slurm submission: sbatch templates and the `vdvae submit` command."""
