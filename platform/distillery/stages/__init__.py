"""The pipeline's stages, each `run(cfg, out_dir) -> manifest` (runner.STAGES orders them)."""
