"""The guarantees SECURITY.md makes that a scan of the code can check: nothing deserializes with
pickle, and the defaults bind to loopback."""
import ast

import pytest
import yaml

from conftest import ROOT

CODE = sorted(p for d in ("platform/distillery", "jobs", "serve", "benchmarks") for p in (ROOT / d).rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _problems(source: str) -> list[str]:
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        out += [f"line {node.lineno}: imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
    for call, name in _calls(tree):
        kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
        if name.endswith("torch.load") and kwargs.get("weights_only") != "True":
            out.append(f"line {call.lineno}: torch.load without weights_only=True")
        if name.endswith(("read_pickle", "to_pickle")) or (name.endswith("np.load") and kwargs.get("allow_pickle") == "True"):
            out.append(f"line {call.lineno}: {name} (pickle)")
        if name in ("eval", "exec"):
            out.append(f"line {call.lineno}: {name}")
        if name.endswith(("yaml.load", "yaml.unsafe_load")):
            out.append(f"line {call.lineno}: {name} (use yaml.safe_load)")
    return out


def test_the_scan_finds_what_it_forbids():
    found = _problems("import pickle\nimport torch, yaml\nfrom dill import loads\ntorch.load('x')\n"
                      "torch.load('x', weights_only=False)\ntorch.load('x', weights_only=True)\nyaml.load(s)\n"
                      "yaml.safe_load(s)\neval('1')\npd.read_pickle('f')\n")
    assert [f.split(":")[0] for f in found] == ["line 1", "line 3", "line 4", "line 5", "line 7", "line 9", "line 10"], found


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_no_unguarded_torch_load(path):
    assert not _problems(path.read_text()), path


def test_defaults_bind_to_loopback_and_ray_token_auth_is_not_turned_off():
    from distillery.config import ServeConfig

    assert ServeConfig().host == "127.0.0.1"
    for path in [*CODE, ROOT / "Makefile", ROOT / "cluster.yaml", ROOT / "serve" / "config.yaml"]:
        assert "RAY_AUTH_MODE=disabled" not in path.read_text(), path


def test_the_cluster_serve_port_is_open_inside_the_cluster_only():
    """serve/config.yaml binds every interface (HAProxy on one node reaches replicas on the others),
    so the network boundary is cluster.yaml's security group: from outside, SSH and nothing else."""
    serve_cfg = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert serve_cfg["http_options"]["host"] in ("127.0.0.1", "0.0.0.0")
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    assert all(not r["CidrIp"].startswith("0.0.0.0") for rule in rules for r in rule["IpRanges"])
    assert all("--dashboard-host=127.0.0.1" in c for c in cluster["head_start_ray_commands"] if "ray start" in c)
