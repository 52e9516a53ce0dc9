"""C*: the fixed target contexts, one exact sequential scan of the Phase-1 model (SPEC section 5).

C*[t] = c_t with c_t = F(c_{t-1}, e_t) and c_{-1} = 0, for every token of a split, with no
gradients, computed by `cvfp.scan.exact_scan` (equal to `model.scan`; see that module). The
file records the sha256 of the Phase-1 checkpoint and tokenizer it was made from; loading
refuses a C* of another checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cvfp.errors import ArtifactError
from cvfp.io import load_tensors, require_fresh, save_tensors, sha256_file
from cvfp.model import CVFPModel
from cvfp.scan import exact_scan

CSTAR_TENSOR = "contexts"


@torch.no_grad()
def generate_cstar(model: CVFPModel, ids: torch.Tensor, device: torch.device | str,
                   progress_desc: str | None = None) -> torch.Tensor:
    """C* of one token stream: ids (N,) -> contexts (N, C) float32 on the CPU, C*[t] = c_t from c_{-1} = 0."""
    embeddings = model.embed(ids.to(device))
    return exact_scan(model, embeddings, progress_desc=progress_desc).float().cpu()


def save_cstar(path: str | Path, contexts: torch.Tensor, phase1_sha256: str, tokenizer_sha256: str) -> None:
    """Write C* (N, C) with the hashes of the Phase-1 checkpoint and tokenizer that produced it."""
    save_tensors(path, {CSTAR_TENSOR: contexts.float()},
                 {"phase1_sha256": phase1_sha256, "tokenizer_sha256": tokenizer_sha256})


def load_cstar(path: str | Path, phase1_path: str | Path) -> torch.Tensor:
    """Read C* (N, C), refusing a corrupted file or one made from another Phase-1 checkpoint."""
    tensors, meta = load_tensors(path, "cstar")
    if CSTAR_TENSOR not in tensors:
        raise ArtifactError(f"{path}: no '{CSTAR_TENSOR}' tensor (not a C* file); rerun the 'cstar' stage (dvc repro -f cstar)")
    if not Path(phase1_path).is_file():
        raise ArtifactError(f"{phase1_path}: missing; run the 'phase1' stage (dvc repro phase1)")
    require_fresh(path, "cstar", {f"Phase-1 checkpoint {phase1_path}": (meta.get("phase1_sha256"),
                                                                          sha256_file(phase1_path))})
    return tensors[CSTAR_TENSOR]
