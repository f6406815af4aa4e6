"""Sign devft's app bundle so that SuperNodes started with `--trusted-entities` run it.

    python deploy/sign_app.py --key pki/app-signer --database /srv/devft/superlink.db
    flwr run @devft/devft devft-lab --run-config '...' --stream

In Flower 1.42 a SuperNode verifies a bundle (FAB) against the signatures the SuperLink
hands out with it, and the SuperLink has signatures only for apps it fetched from Flower
Hub (`flwr app publish`, then `flwr app review` signs them there). `flwr run .` sends a
bundle without signatures, which a SuperNode with `--trusted-entities` refuses. For a
federation without Flower Hub, this script does on the coordinator what Hub does: it builds
the bundle from `--app` exactly as `flwr run` does, signs its SHA-256 with an Ed25519 key
(`python deploy/pki.py signer`, or `ssh-keygen -t ed25519`) in Flower's signature format,
and stores bundle and signature in the SuperLink's database (`flower-superlink --database`)
as the cached Hub app `@<publisher>/<name>`; `flwr run @devft/devft` then runs it with the
signature, and every SuperNode checks it against its own `trusted-entities.yaml`. It writes
through Flower 1.42's own state classes (pinned in pyproject.toml). Sign again after each
code change, and after any `flwr run .` of the same bundle (that stores it unsigned).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import time
import tomllib
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.corestate.sql_corestate import SqlCoreState
from flwr.supercore.fab import Fab
from flwr.supercore.primitives.asymmetric_ed25519 import (
    create_message_to_sign,
    load_private_key,
    sign_message,
)

ADDED_BY = "<id:none>"  # the account id of a SuperLink without user authentication


def app_id(app: Path) -> str:
    """`@<publisher>/<name>` of the app in `app` (what `flwr run @...` names)."""
    config = tomllib.loads((app / "pyproject.toml").read_text())
    return f"@{config['tool']['flwr']['app']['publisher']}/{config['project']['name']}"


def signed_bundle(app: Path, key: Path, key_id: str) -> Fab:
    """The app's bundle with a signature by `key` under `key_id` (Flower Hub's format)."""
    content = build_fab_from_disk(app)
    signed_at = int(time.time())
    message = create_message_to_sign(hashlib.sha256(content).digest(), signed_at)
    signature = sign_message(load_private_key(key), message)
    entry = {"signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii"),
             "signed_at": signed_at}
    return Fab(hashlib.sha256(content).hexdigest(), content,
               {key_id: json.dumps(entry), "valid_license": "Valid"})


class _AppStore(SqlCoreState):
    """The SuperLink's app table only (the node and message methods are never called)."""

    def get_node_id(self) -> int:  # pragma: no cover - abstract in SqlCoreState
        raise NotImplementedError

    def store_message_and_object_tree(self, *args: object,
                                      **kwargs: object) -> None:  # pragma: no cover
        raise NotImplementedError


def store_signed(database: Path, fab: Fab, name: str,
                 federation: str = NOOP_FEDERATION_ID) -> str:
    """Put `fab` into the SuperLink's database as the Hub app `name`; returns its hash."""
    if not database.is_file():
        raise SystemExit(f"{database}: no SuperLink database (start flower-superlink "
                         "with --database FILE first)")
    state = _AppStore(str(database), object_store=None)  # type: ignore[arg-type]
    state.initialize()  # the SuperLink created and migrated the schema: a no-op here
    return state.store_app(fab=fab, federation_id=federation, app_id=name,
                           app_type="serverapp", added_by=ADDED_BY, is_hub_app=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", type=Path, required=True,
                        help="Ed25519 private key in OpenSSH format")
    parser.add_argument("--key-id", help="its id in trusted-entities.yaml (default: the "
                                         "key's file name)")
    parser.add_argument("--database", type=Path, required=True,
                        help="the SuperLink's --database file")
    parser.add_argument("--app", type=Path, default=Path("."), help="app directory")
    parser.add_argument("--federation", default=NOOP_FEDERATION_ID)
    args = parser.parse_args(argv)
    app = args.app.resolve()
    fab = signed_bundle(app, args.key, args.key_id or args.key.name)
    name = app_id(app)
    digest = store_signed(args.database, fab, name, args.federation)
    print(f"signed {name} (bundle {digest[:12]}, {len(fab.content)} bytes) with "
          f"{args.key_id or args.key.name}; run it with: flwr run {name} <connection>")


if __name__ == "__main__":
    main()
