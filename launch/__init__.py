"""Launch configs and renderers: accelerate/DeepSpeed configs, Slurm batch scripts."""
