"""``shoal checkpoints ls|verify|export``: inspect and use checkpoints in any object store.

These commands need no Ray and no running job: they read manifests and
shards straight from the store (``file://...``, a plain path, or
``s3://bucket/prefix`` with ``--endpoint-url``, ``--region``,
``--path-style``). ``URI`` is a checkpoint root (``checkpoint.uri``) or one
checkpoint (``.../step-<N>``).

``storage`` (and so torch) is imported only when a command runs, so that
registering the parser keeps ``shoal --help`` fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.checkpoint import Manifest
    from storage.object_store import ObjectStore

EXIT_OK, EXIT_FAILED, EXIT_CORRUPT = 0, 1, 3


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``checkpoints`` and its subcommands on ``shoal``'s subparsers."""
    store_opts = argparse.ArgumentParser(add_help=False)
    g = store_opts.add_argument_group("object store (S3) options")
    g.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    g.add_argument("--region", help="S3 region (default: the AWS credential chain's)")
    g.add_argument(
        "--path-style", action="store_true", help="path-style bucket addressing (MinIO, moto, ...)"
    )
    p = subparsers.add_parser(
        "checkpoints",
        help="list, verify or export checkpoints (local or S3)",
        description="Inspect checkpoints under a checkpoint root or one step-<N> checkpoint.",
    )
    sub = p.add_subparsers(dest="checkpoints_command", metavar="SUBCOMMAND", required=True)
    ls = sub.add_parser(
        "ls",
        parents=[store_opts],
        help="committed checkpoints: step, size, world size, strategy, time",
    )
    ls.add_argument("uri", help="checkpoint root, e.g. s3://bucket/run/checkpoints")
    ver = sub.add_parser(
        "verify",
        parents=[store_opts],
        help="re-read every shard and check its checksums (exit 3 on corruption)",
    )
    ver.add_argument("uri", help="checkpoint root (all committed checkpoints) or .../step-<N>")
    ex = sub.add_parser(
        "export",
        parents=[store_opts],
        help="write the model weights as one safetensors state dict",
        description="Consolidate a sharded checkpoint into a plain state dict by parameter "
        "name (tied weights under every name), loadable with safetensors.torch.load_file "
        "and model.load_state_dict. Optimizer state is not exported.",
    )
    ex.add_argument("uri", help="checkpoint root (the newest committed one) or .../step-<N>")
    ex.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    return p


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed ``shoal checkpoints ...`` command; returns the exit code."""
    from storage.object_store import StoreError

    opts = {"endpoint_url": args.endpoint_url, "region": args.region, "path_style": args.path_style}
    commands = {"ls": cmd_ls, "verify": cmd_verify}
    try:
        if args.checkpoints_command == "export":
            return cmd_export(args.uri, args.out, opts)
        return commands[args.checkpoints_command](args.uri, opts)
    except StoreError as e:
        print(f"shoal: {e}", file=sys.stderr)
        return EXIT_FAILED


def _open(uri: str, storage_opts: dict[str, Any]) -> tuple[ObjectStore, list[int]]:
    """The store of ``uri``'s checkpoint root and the steps ``uri`` names (all committed ones)."""
    from storage.checkpoint import committed_steps, parse_step_uri
    from storage.object_store import open_store

    parsed = parse_step_uri(uri)
    if parsed is not None:
        return open_store(parsed[0], **storage_opts), [parsed[1]]
    store = open_store(uri, **storage_opts)
    return store, committed_steps(store)


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def cmd_ls(uri: str, storage_opts: dict[str, Any]) -> int:
    """Print one line per committed checkpoint; partial (uncommitted) ones are counted."""
    from storage.checkpoint import (
        CorruptCheckpointError,
        all_step_dirs,
        parse_step_uri,
        read_manifest,
        step_dir,
    )
    from storage.object_store import StoreError

    store, steps = _open(uri, storage_opts)
    if not steps:
        print(f"no committed checkpoints under {store.uri}")
        return EXIT_OK
    print(f"{'step':>10} {'size':>10} {'world':>5} {'strategy':8} {'saved (local time)':19}  uri")
    for step in steps:
        try:
            m = read_manifest(store, step)
        except (CorruptCheckpointError, StoreError) as e:
            print(f"{step:>10} {'?':>10} {'?':>5} {'?':8} {'?':19}  unreadable manifest: {e}")
            continue
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created_at))
        print(
            f"{m.step:>10} {_size(m.nbytes):>10} {m.world_size:>5} {m.strategy:8} {saved:19}  "
            f"{store.uri}/{step_dir(step)}"
        )
    if parse_step_uri(uri) is None:
        partial = len(all_step_dirs(store) - set(steps))
        if partial:
            print(f"({partial} partial checkpoint(s) without a manifest: in flight or abandoned)")
    return EXIT_OK


def cmd_verify(uri: str, storage_opts: dict[str, Any]) -> int:
    """Re-read and checksum every shard; exit 3 naming each corrupt object, 0 if all valid."""
    from storage.checkpoint import CorruptCheckpointError, read_manifest, step_dir, verify

    store, steps = _open(uri, storage_opts)
    if not steps:
        print(f"shoal: no committed checkpoints under {store.uri}", file=sys.stderr)
        return EXIT_FAILED
    bad = 0
    for step in steps:
        where = f"{store.uri}/{step_dir(step)}"
        try:
            problems = verify(store, read_manifest(store, step))
        except CorruptCheckpointError as e:
            problems = [str(e)]
        if problems:
            bad += 1
            print(f"CORRUPT {where}")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"ok      {where}")
    if bad:
        print(f"shoal: {bad} of {len(steps)} checkpoint(s) failed verification", file=sys.stderr)
        return EXIT_CORRUPT
    return EXIT_OK


def export_state_dict(store: ObjectStore, manifest: Manifest) -> dict[str, Any]:
    """The model's parameters by name, assembled from the shards (only ``param`` bytes are read)."""
    from storage.checkpoint import CheckpointReader, CorruptCheckpointError

    reader = CheckpointReader(store, manifest)
    flat = reader.read("param", 0, manifest.numel)
    state = {}
    for slot in manifest.layout:
        shape = [int(d) for d in slot["shape"]]
        numel = 1
        for d in shape:
            numel *= d
        lo = int(slot["offset"])
        state[slot["name"]] = flat[lo : lo + numel].view(shape).clone()
    # Tied weights (a state dict lists them under every name) come from the
    # manifest's own record, made at save time: nothing is built from a manifest.
    for alias, owner in manifest.tied.items():
        if owner not in state:
            raise CorruptCheckpointError(f"tied weight {alias!r} names a missing {owner!r}")
        # safetensors refuses tensors that share memory: each name gets its own copy.
        state[alias] = state[owner].clone()
    return state


def cmd_export(uri: str, out: str, storage_opts: dict[str, Any]) -> int:
    """Write the newest (or the named) checkpoint's weights to ``out`` as safetensors."""
    from safetensors.torch import save_file

    from storage.checkpoint import CorruptCheckpointError, check_objects, read_manifest

    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        print(f"shoal: --out {out}: the folder {out_dir} does not exist", file=sys.stderr)
        return EXIT_FAILED
    store, steps = _open(uri, storage_opts)
    if not steps:
        print(f"shoal: no committed checkpoints under {store.uri}", file=sys.stderr)
        return EXIT_FAILED
    try:
        manifest = read_manifest(store, steps[-1])
        check_objects(store, manifest)
        state = export_state_dict(store, manifest)
    except CorruptCheckpointError as e:
        print(f"shoal: {e}", file=sys.stderr)
        return EXIT_CORRUPT
    if not manifest.tied and manifest.lineage == "":
        print(
            "shoal: note: this checkpoint predates recorded tied-weight names; tied aliases "
            "(if the model has any) are not exported",
            file=sys.stderr,
        )
    try:
        save_file(state, out, metadata={"step": str(manifest.step), "source": store.uri})
    except OSError as e:
        print(f"shoal: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    n = sum(t.numel() for name, t in state.items())
    print(f"wrote {out}: {len(state)} tensors, {n:,} values, step {manifest.step}")
    return EXIT_OK
