"""The serving side: the bundle format, the batched runtime, the HTTP API and the Ray Serve app."""
