import pytest

from cvfp.errors import ArtifactError
from cvfp.io import require_fresh


def test_require_fresh_refuses_a_stale_artifact():
    require_fresh("models/x.pt", "phase1", {"tokenizer": ("abc", "abc")})
    require_fresh("models/x.pt", "phase1", {"tokenizer": (None, "abc")}, unrecorded_ok=True)  # nothing recorded
    with pytest.raises(ArtifactError, match="phase2") as caught:
        require_fresh("models/x.pt", "phase2", {"tokenizer": ("t", "t"), "Phase-1 checkpoint": ("old", "new")})
    assert "old" in str(caught.value) and "new" in str(caught.value) and "models/x.pt" in str(caught.value)


def test_require_fresh_refuses_an_unrecorded_source_unless_told():
    with pytest.raises(ArtifactError, match="none recorded"):
        require_fresh("data/x.safetensors", "cache", {"tokenizer": (None, "abc")})
