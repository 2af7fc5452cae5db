"""Where a job runs: what Hydra's runtime says about it (runtime), its share of this
machine's cores and GPUs (local), and processes of its own for DDP (processes)."""
