"""Import target of `serve deploy serve/config.yaml` and `serve run serve.app:app bundle=...`.

It only builds the application from typed args; the deployments live in distillery.serving.
"""
from distillery.serving.app import AppArgs, build_app


def app(args: AppArgs):
    """Ray Serve application builder: `args` is validated against `AppArgs` (bundle path or URI,
    batch size and wait, body limit, threads) before anything is deployed."""
    return build_app(args)
