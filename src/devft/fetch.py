"""`devft fetch`: copy a finished run's outputs off the coordinator, check them, show their use.

A deployment run writes its outputs into `output.dir` on the SuperLink's machine. Flower 1.42's
`flwr pull` cannot collect them: it only asks the SuperLink for a download URL, which only the
enterprise edition's artifact provider gives (docs/deployment.md). So devft copies them itself:
over ssh with rsync (else scp) from `[user@]host:RUN_DIR`, or from a local path (a mounted
share). Only what a user needs is copied (adapter/, summary.json, metrics.jsonl, config.json,
loss.png; checkpoints/ on request), into a staging folder beside DEST. It is checked there (the
adapter's config and weights are whole, and their SHA-256 are those summary.json recorded)
and only then moved into DEST, so a failed or partial copy never replaces a good one."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devft.errors import ConfigError, DevFTError
from devft.rundir_check import RunCheck, check_run

RUN_FILES = ("summary.json", "metrics.jsonl", "config.json", "loss.png")
ADAPTER, CHECKPOINTS = "adapter", "checkpoints"
TRANSFERS = ("auto", "rsync", "scp")
REMOTE_RSYNC_MISSING = 127  # rsync's exit status when the other end has no rsync
# [user@]host:path, as scp and rsync read it: a colon before any slash (host may be [IPv6])
_REMOTE = re.compile(r"^(?P<host>(?:[^@/:\[\]\s]+@)?(?:\[[0-9A-Fa-f:.%\w]+\]|[^@/:\[\]\s]+))"
                     r":(?P<path>.*)$")


class FetchError(DevFTError):
    """The outputs could not be copied: no copy tool, or it failed and nothing arrived.
    (What arrived but is not a finished run's whole outputs is a RunFileError.)"""


@dataclass(frozen=True)
class Source:
    """Where a run's outputs are: `host` ("[user@]host", None for a local path) and `path`."""

    host: str | None
    path: str

    def __str__(self) -> str:
        return f"{self.host}:{self.path}" if self.host else self.path

    def item(self, name: str) -> str:
        """`name` inside a remote run directory, as scp addresses it."""
        return f"{self.host}:{self.path.rstrip('/')}/{name}"


@dataclass
class Fetched:
    """What `fetch_run` copied, with which tool, and what the check found."""

    source: Source
    dest: Path
    tool: str
    names: list[str]
    check: RunCheck
    notes: list[str] = field(default_factory=list)


def parse_source(text: str) -> Source:
    """SOURCE as scp reads it: `[user@]host:RUN_DIR` when a colon comes before any slash,
    else a local path (`./a:b` is local)."""
    match = None if text.startswith(("/", ".", "~")) else _REMOTE.match(text)
    if match is None:
        if not text:
            raise ConfigError("SOURCE", text, "[user@]host:RUN_DIR or a local run directory")
        return Source(None, text)
    if not match["path"]:
        raise ConfigError("SOURCE", text, "[user@]host:RUN_DIR, with the run's output.dir after "
                          "the colon")
    return Source(match["host"], match["path"])


def wanted(checkpoints: bool) -> list[str]:
    """The names `devft fetch` copies from a run directory."""
    return [ADAPTER, *RUN_FILES, *([CHECKPOINTS] if checkpoints else [])]


def transfer_command(tool: str, source: Source, names: list[str], staging: Path,
                     ssh_config: str | None = None) -> list[str]:
    """The rsync or scp command that copies `names` of a remote `source` into `staging`."""
    if tool == "rsync":
        ssh = ["-e", f"ssh -F {_quoted(ssh_config)}"] if ssh_config else []
        filters = [f"--include=/{n}/***" if n in (ADAPTER, CHECKPOINTS) else f"--include=/{n}"
                   for n in names]
        return ["rsync", "-a", *ssh, *filters, "--exclude=*",
                f"{source.host}:{source.path.rstrip('/')}/", f"{staging}/"]
    ssh = ["-F", ssh_config] if ssh_config else []
    return ["scp", "-r", "-p", *ssh, *[source.item(n) for n in names], f"{staging}/"]


def _quoted(path: str) -> str:
    """A path for rsync's -e command line (split by rsync on spaces, honouring quotes)."""
    return f"'{path}'" if " " in path else path


def _copy_local(source: Source, names: list[str], staging: Path) -> None:
    root = Path(source.path).expanduser()
    if not root.is_dir():
        raise ConfigError("SOURCE", source.path, "an existing run directory (the run's "
                          "output.dir), or [user@]host:RUN_DIR to copy over ssh")
    for name in names:
        item = root / name
        if item.is_dir():
            shutil.copytree(item, staging / name, symlinks=False)
        elif item.is_file():
            shutil.copy2(item, staging / name)


def pick_tool(transfer: str) -> str:
    """rsync or scp, as `--transfer` asks and PATH allows."""
    if transfer != "auto":
        if shutil.which(transfer) is None:
            raise ConfigError("--transfer", transfer, f"a copy tool on PATH ({transfer} is not "
                              "installed here); auto picks rsync, else scp")
        return transfer
    for tool in ("rsync", "scp"):
        if shutil.which(tool):
            return tool
    raise FetchError("fetching from a remote SOURCE needs rsync or scp (with ssh) on PATH, and "
                     "neither is installed: install openssh-client (and rsync), or mount the "
                     "coordinator's disk and pass the run directory as a local path")


def _copy_remote(source: Source, names: list[str], staging: Path, transfer: str,
                 ssh_config: str | None, notes: list[str]) -> tuple[str, str | None]:
    """Run rsync or scp; returns the tool that ran and, if it failed, its last error line.
    A failure is judged by what arrived: scp also fails when an optional file is absent."""
    tool = pick_tool(transfer)
    proc = _run(transfer_command(tool, source, names, staging, ssh_config))
    if (tool == "rsync" and transfer == "auto" and proc.returncode == REMOTE_RSYNC_MISSING
            and shutil.which("scp")):
        notes.append(f"{source.host} has no rsync; copied with scp")
        tool = "scp"
        proc = _run(transfer_command(tool, source, names, staging, ssh_config))
    if proc.returncode == 0:
        return tool, None
    why = f"{tool}: {_cause(proc.stderr) or f'exit status {proc.returncode}'}"
    if not any(staging.iterdir()):
        raise FetchError(f"copying {source} failed ({why})")
    return tool, why


def _cause(stderr: str) -> str | None:
    """The line of a copy tool's errors that says why: ssh's own, else the last one that is not
    rsync's closing summary."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    ssh = [ln for ln in lines if ln.startswith("ssh:")]
    if ssh:
        return ssh[0]
    detail = [ln for ln in lines if not ln.startswith(
        ("rsync error:", "rsync: connection unexpectedly closed", "rsync: [Receiver] write"))]
    return (detail or lines or [None])[-1]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    # stdin stays the terminal: ssh may ask for a passphrase or to accept a host key
    return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)


def _install(staging: Path, dest: Path, names: list[str]) -> None:
    """Move what arrived into DEST (under its lock: never into a live run's folder), each
    item replacing its old copy; an output that did not arrive is removed from DEST, so
    nothing of an earlier fetch passes for this run's."""
    from devft.lock import OutputInUseError, output_lock

    try:
        with output_lock(dest, "devft fetch"):
            for name in names:
                _replace(staging / name, dest / name)
    except OutputInUseError:
        raise ConfigError("DEST", str(dest), "a directory no live devft run writes to; wait "
                          "for it to end, or pick another DEST") from None


def _replace(new: Path, target: Path) -> None:
    """`new` (if it exists) in place of `target` (if it exists)."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    if new.exists():
        os.replace(new, target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.exists() or old.is_symlink():
        old.unlink()


def fetch_run(source_text: str, dest: str | Path, checkpoints: bool = False,
              transfer: str = "auto", ssh_config: str | None = None) -> Fetched:
    """Copy a finished run's outputs from `source_text` into `dest`, checked (see module)."""
    source = parse_source(source_text)
    if transfer not in TRANSFERS:
        raise ConfigError("--transfer", transfer, f"one of {', '.join(TRANSFERS)}")
    if ssh_config is not None and not Path(ssh_config).expanduser().is_file():
        raise ConfigError("--ssh-config", ssh_config, "an existing ssh_config file")
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise ConfigError("DEST", str(dest), "a directory (it is created if missing)")
    if source.host is None and dest.resolve() == Path(source.path).expanduser().resolve():
        raise ConfigError("DEST", str(dest), "another directory than SOURCE")
    dest.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = dest.absolute().parent / f".{dest.absolute().name}.fetch-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
    except OSError as err:
        raise ConfigError("DEST", str(dest), f"a place this user can write to ({err})") from None
    names, notes = wanted(checkpoints), []
    try:
        failed = None
        if source.host is None:
            _copy_local(source, names, staging)
            tool = "local copy"
        else:
            tool, failed = _copy_remote(source, names, staging, transfer,
                                        os.path.expanduser(ssh_config) if ssh_config else None,
                                        notes)
        check = check_run(staging, str(source))
        arrived = [n for n in names if (staging / n).exists()]
        _install(staging, dest, names)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    absent = [n for n in names if n not in arrived]
    if absent:
        notes.append(f"not copied: {', '.join(absent)} ({failed or f'not in {source}'})")
    elif failed:
        notes.append(f"the copy reported an error, yet everything arrived and checked: {failed}")
    return Fetched(source, dest, tool, arrived, check, notes)


def report_lines(fetched: Fetched, dest_text: str) -> list[str]:
    """What `devft fetch` prints: what arrived, what was checked, and the command to use it."""
    check, summary = fetched.check, fetched.check.summary
    items = [f"{n}/" if n in (ADAPTER, CHECKPOINTS) else n for n in fetched.names]
    loss = summary.get("final_eval_loss")
    first = summary.get("initial_eval_loss")
    losses = (f"held-out loss {first:.4f} -> {loss:.4f}"
              if isinstance(loss, float) and isinstance(first, float) else "no held-out loss")
    adapter = shlex.quote(str(Path(dest_text) / ADAPTER))
    model = " --model BASE" if check.base_missing else ""
    lines = [
        f"fetched {fetched.source} into {dest_text} ({fetched.tool}): {', '.join(items)}",
        f"checked: {check.verdict}",
        f"run: {summary.get('method')}, {summary.get('rounds')} rounds, {losses}; "
        f"base model {check.base}",
        *(f"note: {n}" for n in fetched.notes),
        f"use it: devft generate --adapter {adapter}{model} --prompt \"...\"",
    ]
    if check.base_missing:
        lines.append(f"  (BASE: the base model on this machine; {check.base} exists only on "
                     "the machine that ran)")
    return lines


def add_fetch_parser(subparsers: Any) -> None:
    """Add the `fetch` sub-command to an argparse sub-parsers object."""
    help_ = "copy a run's adapter and summary off the coordinator, checked"
    p = subparsers.add_parser(
        "fetch", help=help_, description=help_ + ". Copies adapter/, summary.json, "
        "metrics.jsonl, config.json and loss.png (not checkpoints/ unless --checkpoints).",
        epilog="SOURCE is [user@]host:RUN_DIR (ssh, with rsync or scp) or a local path; "
        "DEST is created or updated. See docs/cli.md and docs/deployment.md.")
    p.add_argument("source", metavar="SOURCE", help="[user@]host:RUN_DIR, or a local RUN_DIR")
    p.add_argument("dest", metavar="DEST", help="local directory for the outputs")
    p.add_argument("--checkpoints", action="store_true",
                   help="also copy checkpoints/ (the latest round's checkpoint)")
    p.add_argument("--transfer", choices=TRANSFERS, default="auto",
                   help="copy tool for a remote SOURCE (default auto: rsync, else scp)")
    p.add_argument("--ssh-config", metavar="FILE",
                   help="ssh_config file for the coordinator (port, key, jump host); default: "
                        "ssh's own (~/.ssh/config)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def fetch_main(args: argparse.Namespace) -> int:
    """Run `devft fetch` for parsed `args`; returns the exit code (0)."""
    fetched = fetch_run(args.source, args.dest, args.checkpoints, args.transfer,
                        args.ssh_config)
    print("\n".join(report_lines(fetched, args.dest)))
    return 0

