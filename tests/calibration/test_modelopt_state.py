"""ModelOpt quantizer state <-> trtkit calibration file, against a real `mtq.quantize`d tiny UNet.

The tests marked `modelopt` need `pip install 'trtkit[modelopt]'` (CI runs them in their own venv:
.ci/run); the error paths below them need only torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trtkit import calibfile
from trtkit.errors import TrtkitError

SHAPES = {"sample": (2, 4, 32, 32), "timestep": (1,), "encoder_hidden_states": (2, 77, 64), "text_embeds": (2, 32),
          "time_ids": (2, 6)}


def feeds(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(2, 4, 32, 32, generator=g), "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(2, 77, 64, generator=g),
            "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)}


def run(unet, f: dict[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return unet(f["sample"], f["timestep"], encoder_hidden_states=f["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": f["text_embeds"], "time_ids": f["time_ids"]}).sample


def load_unet(model_dir: Path):  # type: ignore[no-untyped-def]
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(model_dir / "unet")).eval()


def mtq_unet(model_dir: Path, precision: str, level: float, seeds: tuple[int, ...] = (10, 11)):  # type: ignore[no-untyped-def]
    from trtkit.calibration.modelopt_flow import quantize_unet

    unet = load_unet(model_dir)

    def loop(m) -> None:  # type: ignore[no-untyped-def]
        for s in seeds:
            run(m, feeds(s))

    with torch.no_grad():
        return quantize_unet(unet, precision, level, loop)


@pytest.fixture(scope="module")
def int8_ckpt(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    pytest.importorskip("modelopt.torch.quantization")
    import modelopt.torch.opt as mto

    unet = mtq_unet(tiny_model_dir, "int8", 3.0)
    path = tmp_path_factory.mktemp("mo") / "unet.int8.pth"
    mto.save(unet, str(path))
    return unet, path


def layernorm_inputs(unet) -> list:  # type: ignore[no-untyped-def]
    """ModelOpt's `*input_quantizer` also quantizes LayerNorm inputs; trtkit quantizes weighted ops only."""
    return [m.input_quantizer for m in unet.modules() if hasattr(m, "input_quantizer") and
            not hasattr(m, "weight_quantizer")]


def enabled_input_amax(unet) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The ranges trtkit takes: inputs of modules with a weight quantizer, and the attention BMM inputs."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    mods = dict(unet.named_modules())
    out = {}
    for name, m in unet.named_modules():
        module, _, q = name.rpartition(".")
        wanted = (q == "input_quantizer" and hasattr(mods[module], "weight_quantizer")) or q.endswith("bmm_quantizer")
        if isinstance(m, TensorQuantizer) and wanted and m.is_enabled and m.amax is not None:
            out[name] = float(m.amax)
    return out


@pytest.mark.modelopt
def test_from_modelopt_takes_every_enabled_activation_range(int8_ckpt, tiny_model_dir: Path, tmp_path: Path) -> None:
    from trtkit.calibration import modelopt_state

    unet, path = int8_ckpt
    out = modelopt_state.convert_to_calib(path, tmp_path / "calib.json", model_dir=tiny_model_dir)
    cal = calibfile.load(out)
    want = {k.rsplit(".", 1)[0]: v for k, v in enabled_input_amax(unet).items()}
    assert cal.precision == "int8"
    assert cal.activations == pytest.approx(want, rel=1e-6)
    # level 3 with ModelOpt's filter: 26 convs + 126 linears + the 6 proj_out its filter lacks
    assert len(cal.activations) == 26 + 126 + 6
    assert "conv_in" not in cal.activations and "down_blocks.1.attentions.0.proj_out" in cal.activations
    assert cal.settings["unweighted_inputs_left_out"] == len(layernorm_inputs(unet)) == 36


@pytest.mark.modelopt
def test_same_ranges_same_output_as_modelopt(int8_ckpt, tiny_model_dir: Path) -> None:
    """trtkit's fake quantization driven by the converted file quantizes like ModelOpt's UNet."""
    from trtkit.calibration import fakequant, modelopt_state

    unet, path = int8_ckpt
    cal = modelopt_state.to_calibration(modelopt_state.load(path))
    ref_unet = load_unet(tiny_model_dir)
    f = feeds(3)
    fp32 = run(ref_unet, f)
    with fakequant.quantized(ref_unet, cal):
        ours = run(ref_unet, f)
    lns = layernorm_inputs(unet)
    try:
        for q in lns:
            q.disable()
        theirs = run(unet, f)
    finally:
        for q in lns:
            q.enable()
    err_theirs = float((theirs - fp32).norm() / fp32.norm())
    err_ours = float((ours - fp32).norm() / fp32.norm())
    assert err_theirs > 1e-3  # the quantization is real
    # Same ranges, same fake quantization (per tensor, round half even, per-channel weights): the same
    # error. Not the same bits: ModelOpt runs SDPA, trtkit's taps diffusers' BMM attention, and a 1e-7
    # difference flips roundings that the random-weight UNet then amplifies layer by layer.
    assert abs(err_ours - err_theirs) < 0.25 * err_theirs, (err_ours, err_theirs)


@pytest.mark.modelopt
def test_round_trip_restores_modelopt_ranges(int8_ckpt, tiny_model_dir: Path, tmp_path: Path) -> None:
    """ModelOpt -> trtkit -> ModelOpt: loaded into a UNet calibrated on other data, the ranges and the
    output become those of the original."""
    from modelopt.torch.quantization.utils import set_quantizer_state_dict

    from trtkit.calibration import modelopt_state

    unet, path = int8_ckpt
    calib = modelopt_state.convert_to_calib(path, tmp_path / "calib.json")
    back = modelopt_state.convert_to_modelopt(calib, tmp_path / "amax.pt", model_dir=tiny_model_dir)
    other = mtq_unet(tiny_model_dir, "int8", 3.0, seeds=(20,))
    assert enabled_input_amax(other) != pytest.approx(enabled_input_amax(unet))
    set_quantizer_state_dict(other, torch.load(back, weights_only=True))
    assert enabled_input_amax(other) == pytest.approx(enabled_input_amax(unet), rel=1e-6)
    f = feeds(4)
    lns = layernorm_inputs(unet) + layernorm_inputs(other)  # not trtkit's to carry: see layernorm_inputs
    try:
        for q in lns:
            q.disable()
        torch.testing.assert_close(run(other, f), run(unet, f))
    finally:
        for q in lns:
            q.enable()


@pytest.mark.modelopt
def test_fp8_level4_attention_ranges(tiny_model_dir: Path, tmp_path: Path) -> None:
    import modelopt.torch.opt as mto

    from trtkit.calibration import modelopt_state

    unet = mtq_unet(tiny_model_dir, "fp8", 4.0, seeds=(10,))
    mto.save(unet, str(tmp_path / "fp8.pth"))
    cal = modelopt_state.to_calibration(modelopt_state.load(tmp_path / "fp8.pth"))
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert cal.precision == "fp8"
    assert cal.activations[f"{attn}.q_bmm"] == pytest.approx(float(unet.get_submodule(attn).q_bmm_quantizer.amax))
    assert sum(k.endswith(".k_bmm") for k in cal.activations) == 24
    with pytest.raises(TrtkitError, match="are fp8, not int8"):
        modelopt_state.to_calibration(modelopt_state.load(tmp_path / "fp8.pth"), precision="int8")


@pytest.mark.modelopt
def test_cli_from_and_to_modelopt(int8_ckpt, tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.test_cli import run_cli

    _, path = int8_ckpt
    p = run_cli("calibrate", str(tiny_model_dir), "--from-modelopt", str(path), "-o", str(tmp_path / "c.json"))
    assert p.returncode == 0, p.stderr
    assert "158 activation ranges" in p.stdout
    p = run_cli("calibrate", "--to-modelopt", str(tmp_path / "c.json"), "-o", str(tmp_path / "a.pt"))
    assert p.returncode == 0, p.stderr
    assert len(torch.load(tmp_path / "a.pt", weights_only=True)) == 158


# --------------------------------------------------------------------------- no modelopt needed

def test_state_without_ranges_is_an_error(tmp_path: Path) -> None:
    from trtkit.calibration import modelopt_state

    # what mto.modelopt_state(model) alone holds: properties, no _amax
    doc = {"modelopt_state": {"modelopt_state_dict": [("quantize", {"metadata": {"quantizer_state": {
        "conv1.input_quantizer": {"_num_bits": 8, "_axis": None, "_disabled": False}}}})]}}
    torch.save(doc, tmp_path / "state.pt")
    with pytest.raises(TrtkitError, match="no quantizer ranges"):
        modelopt_state.load(tmp_path / "state.pt")


def test_per_channel_activation_is_an_error() -> None:
    from trtkit.calibration import modelopt_state

    st = modelopt_state.parse({"conv1.input_quantizer._amax": torch.ones(4)})
    with pytest.raises(TrtkitError, match="per-channel range"):
        modelopt_state.to_calibration(st)


def test_plain_state_dict_and_disabled_quantizers(tmp_path: Path) -> None:
    from trtkit.calibration import modelopt_state

    sd = {"conv1.input_quantizer._amax": torch.tensor(2.5), "conv1.weight_quantizer._amax": torch.ones(4, 1, 1, 1),
          "a.attn1.q_bmm_quantizer._amax": torch.tensor(3.0), "conv1.weight": torch.ones(4, 3, 3, 3)}
    cal = modelopt_state.to_calibration(modelopt_state.parse(sd))
    assert cal.activations == {"conv1": 2.5, "a.attn1.q_bmm": 3.0}
    back = modelopt_state.from_calibration(cal)
    assert set(back) == {"conv1.input_quantizer", "a.attn1.q_bmm_quantizer"}
    # with properties, a disabled quantizer is left out even though its range survived the disable
    doc = {"model_state_dict": sd, "modelopt_state": {"modelopt_state_dict": [("quantize", {"metadata": {
        "quantizer_state": {"conv1.input_quantizer": {"_num_bits": 8, "_disabled": True},
                            "a.attn1.q_bmm_quantizer": {"_num_bits": 8, "_disabled": False}}}})]}}
    cal = modelopt_state.to_calibration(modelopt_state.parse(doc))
    assert cal.activations == {"a.attn1.q_bmm": 3.0}


def test_cli_errors(tmp_path: Path) -> None:
    from tests.test_cli import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("calibrate", "--from-modelopt", str(tmp_path / "no.pt")), "does not exist")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert_one_line_error(run_cli("calibrate", "--from-modelopt", str(tmp_path / "junk.pt"), "-o",
                                  str(tmp_path / "c.json")), "not a torch checkpoint")
    assert not (tmp_path / "c.json").exists()
    assert_one_line_error(run_cli("calibrate"), "MODEL_DIR")
