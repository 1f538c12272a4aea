from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from builder_models import make_linear

from trtkit._files import sha256_files
from trtkit.builder.source import read_onnx
from trtkit.errors import TrtkitError


def test_tiny_unet(tiny_unet_onnx: Path, tiny_model_dir: Path) -> None:
    s = read_onnx(tiny_unet_onnx)
    assert list(s.inputs) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert s.inputs["sample"][1] == 4 and s.inputs["encoder_hidden_states"][2] == 64
    assert s.outputs == ("noise_pred",) and s.component == "unet" and not s.has_qdq
    assert s.model_dir == tiny_model_dir and s.opset == 19
    assert s.sha256() == sha256_files([tiny_unet_onnx])


@pytest.mark.parametrize("qdq", ["int8", "fp8"])
def test_qdq_types(tmp_path: Path, qdq: str) -> None:
    s = read_onnx(make_linear(tmp_path / "m.onnx", qdq))
    assert s.qdq_types == (qdq,) and s.has_qdq


def test_external_data_hashed(tmp_path: Path) -> None:
    p = make_linear(tmp_path / "m.onnx", external=True)
    s = read_onnx(p)
    assert s.data_files == (tmp_path / "m.onnx.data",)
    before = s.sha256()
    data = bytearray((tmp_path / "m.onnx.data").read_bytes())
    data[0] ^= 1
    (tmp_path / "m.onnx.data").write_bytes(bytes(data))
    assert read_onnx(p).sha256() != before  # a change in the weights alone changes the hash (and the cache key)


def test_missing_external_data(tmp_path: Path) -> None:
    p = make_linear(tmp_path / "m.onnx", external=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(TrtkitError, match="m.onnx.data, which is missing"):
        read_onnx(p)


@pytest.mark.parametrize("content", [b"", b"this is not an onnx model\n", bytes(range(256)) * 4])
def test_malformed(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(TrtkitError, match="not a readable ONNX model") as e:
        read_onnx(p)
    assert "\n" not in str(e.value)


def test_truncated(tmp_path: Path) -> None:
    good = make_linear(tmp_path / "m.onnx")
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(TrtkitError, match="not a readable ONNX model"):
        read_onnx(bad)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TrtkitError, match="does not exist"):
        read_onnx(tmp_path / "nope.onnx")


def test_component_guess_without_metadata(tmp_path: Path) -> None:
    m = onnx.load(str(make_linear(tmp_path / "m.onnx")))
    m.graph.input[0].name = "latent"
    for n in m.graph.node:
        n.input[:] = ["latent" if i == "x" else i for i in n.input]
    onnx.save(m, str(tmp_path / "v.onnx"))
    assert read_onnx(tmp_path / "v.onnx").component == "vae_decoder"
