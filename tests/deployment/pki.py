"""Throw-away PKI for deployment tests: deploy/pki.py and deploy/sign_app.py, the scripts the
deploy example documents.

Loaded by path (deploy/ is not a package), so the tests exercise the very scripts a
coordinator and the data owners run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"devft_deploy_{name}", DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


_pki = _load("pki")
sign_app = _load("sign_app")

NodeKeys = _pki.NodeKeys
ServerCerts = _pki.ServerCerts
make_node_keys = _pki.make_node_keys
make_server_certs = _pki.make_server_certs
make_signer = _pki.make_signer
