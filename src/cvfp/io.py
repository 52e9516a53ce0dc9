"""Files: atomic writes, content hashes, and tensor files that detect their own corruption.

Every output is written to a temporary name in the same folder and renamed, so a killed or
failing stage never leaves a half-written file behind. Tensor files are safetensors with
a sidecar-free integrity check: the sha256 of the tensors is stored in the file's metadata
and verified on load.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save

from cvfp.errors import ArtifactError


def require_fresh(path: str | Path, stage: str, sources: dict[str, tuple[str | None, str]],
                  unrecorded_ok: bool = False) -> None:
    """The one staleness check: refuse an artifact built from other inputs than the files on disk now.

    `sources` maps each input's name to (the sha256 the artifact recorded, that input's sha256
    now), e.g. {"tokenizer": (meta.get("tokenizer_sha256"), sha256_file(TOKENIZER))}. A hash the
    artifact did not record is stale too, unless `unrecorded_ok`. The message names the
    artifact, the input, both hashes and the stage to rerun.
    """
    for source, (recorded, current) in sources.items():
        if recorded is None and unrecorded_ok:
            continue
        if recorded != current:
            raise ArtifactError(f"{path}: stale: built from the {source} with sha256 {recorded or '(none recorded)'}, "
                                f"but it now has sha256 {current}; rerun the '{stage}' stage (dvc repro {stage})")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """A table (one dict per row) as CSV for `dvc plots`; columns in order of first appearance, gaps empty."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: str | Path, stage: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; run the '{stage}' stage (dvc repro {stage})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: corrupted JSON ({err}); rerun the '{stage}' stage (dvc repro -f {stage})") from None


def tensor_digest(tensors: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Save CPU tensors with safetensors, atomically, recording their sha256 in the metadata."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = dict(metadata or {})
    meta["sha256"] = tensor_digest(tensors)
    with atomic_path(path) as tmp:
        tmp.write_bytes(_canonical_safetensors(save(tensors, metadata=meta)))


def _canonical_safetensors(blob: bytes) -> bytes:
    """Rewrite the JSON header with sorted keys: safetensors writes its metadata map in a random
    (hash) order, which would make identical tensors hash differently in dvc.lock."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


def load_tensors(path: str | Path, stage: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Load a file written by `save_tensors`; a truncated or bit-flipped file is an ArtifactError."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; run the '{stage}' stage (dvc repro {stage})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises several types for a damaged header/body
        raise ArtifactError(f"{path}: unreadable or truncated ({err}); rerun the '{stage}' stage (dvc repro -f {stage})") from None
    if meta.get("sha256") != tensor_digest(tensors):
        raise ArtifactError(f"{path}: content hash mismatch (file corrupted); rerun the '{stage}' stage (dvc repro -f {stage})")
    return tensors, meta


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """torch.save a dict holding `state_dict` (plus plain values), atomically, with the weights' sha256."""
    payload = dict(payload)
    payload["state_dict"] = {k: v.detach().cpu() for k, v in payload["state_dict"].items()}
    payload["sha256"] = tensor_digest(payload["state_dict"])
    buffer = io.BytesIO()  # torch.save names the archive after the file: a temp name would change the bytes
    torch.save(payload, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_checkpoint(path: str | Path, stage: str) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True` (nothing is unpickled) and verify its weights' hash."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; run the '{stage}' stage (dvc repro {stage})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle opcode, ...
        raise ArtifactError(f"{path}: unreadable checkpoint ({type(err).__name__}); rerun the '{stage}' stage (dvc repro -f {stage})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise ArtifactError(f"{path}: not a cvfp checkpoint; rerun the '{stage}' stage (dvc repro -f {stage})")
    if payload.get("sha256") != tensor_digest(payload["state_dict"]):
        raise ArtifactError(f"{path}: weights hash mismatch (file corrupted); rerun the '{stage}' stage (dvc repro -f {stage})")
    return payload
