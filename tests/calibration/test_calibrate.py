"""A real calibration run on the tiny pipeline: file contents, module check, resumability, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trtkit import calibfile
from trtkit.calibration.calibrate import (
    CalibrateConfig,
    Recipe,
    calibrate,
    load_for_model,
    partial_path,
    unet_module_names,
)
from trtkit.calibration.levels import targets
from trtkit.errors import TrtkitError


class Interrupt(Exception):
    pass


def _cfg(model_dir: Path, out: Path, **kw) -> CalibrateConfig:  # type: ignore[no-untyped-def]
    base = dict(model_dir=model_dir, out=out, num_prompts=2, steps=2, batch=1, height=64, width=64,
                device="cpu", sample_rows=32)
    base.update(kw)
    return CalibrateConfig(**base)


@pytest.fixture(scope="module")
def calib_json(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calib") / "calib.json"
    return calibrate(_cfg(tiny_model_dir, out, recipe=Recipe(smoothquant=True)))


def test_file_contents(calib_json: Path, tiny_model_dir: Path) -> None:
    cal = load_for_model(calib_json, tiny_model_dir)
    doc = json.loads(calib_json.read_text())
    assert doc["run"]["prompts"] and doc["run"]["steps"] == 2 and doc["run"]["num_prompts"] == 2
    assert doc["settings"]["reduction"] == "mean" and doc["settings"]["level"] == 3.0
    assert doc["settings"]["smoothquant"] is True
    assert doc["model"]["config_hash"] and doc["model"]["class"] == "UNet2DConditionModel"
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_model_dir / "unet"))
    assert set(cal.activations) == set(targets(unet, 3.0))  # every quantized input, nothing else
    assert all(v > 0 for v in cal.activations.values())
    # SmoothQuant vectors: INT8 linear layers only, one entry per input channel, alpha from the grid
    mods = dict(unet.named_modules())
    assert cal.smooth and all(isinstance(mods[k], torch.nn.Linear) for k in cal.smooth)
    for k, s in cal.smooth.items():
        assert s.shape == (mods[k].in_features,) and np.all(s > 0) and 0.5 <= cal.alphas[k] <= 0.95


def test_rejected_for_a_model_without_those_modules(calib_json: Path, tiny_model_dir: Path,
                                                    tmp_path: Path) -> None:
    cal = calibfile.load(calib_json)
    cal.activations["mid_block.attentions.7.proj_in"] = 1.0
    bad = calibfile.save(cal, tmp_path / "bad.json")
    with pytest.raises(TrtkitError, match=r"mid_block\.attentions\.7\.proj_in.*does not have"):
        load_for_model(bad, tiny_model_dir)
    names = unet_module_names(tiny_model_dir)
    with pytest.raises(TrtkitError, match="another model"):
        cal.check_modules(names)


def test_round_trip(calib_json: Path, tmp_path: Path) -> None:
    cal = calibfile.load(calib_json)
    again = calibfile.load(calibfile.save(cal, tmp_path / "again.json"))
    assert again.activations == cal.activations and again.alphas == cal.alphas
    assert again.settings == cal.settings and again.run == cal.run and again.model == cal.model
    for k, v in cal.smooth.items():
        np.testing.assert_array_equal(again.smooth[k], v)


def test_fake_quantized_unet_stays_close(calib_json: Path, tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    from trtkit.calibration.fakequant import quantized

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").eval()
    cal = calibfile.load(calib_json)
    g = torch.Generator().manual_seed(0)
    feeds = dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                 encoder_hidden_states=torch.randn(2, 77, 64, generator=g),
                 added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g),
                                    "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)})
    with torch.no_grad():
        ref = unet(**feeds).sample
        with quantized(unet, cal):
            q = unet(**feeds).sample
        again = unet(**feeds).sample
    torch.testing.assert_close(again, ref)  # weights restored
    rel = float((q - ref).norm() / ref.norm())
    assert 0 < rel < 0.25, rel


def test_resume_after_interrupt(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "calib.json"
    cfg = _cfg(tiny_model_dir, out, recipe=Recipe(smoothquant=False))

    def stop_after_first(done: int, total: int, msg: str) -> None:
        if done == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        calibrate(cfg, progress=stop_after_first)
    assert not out.exists() and partial_path(out).is_file()  # nothing half-written, stats kept
    calls: list[tuple[int, int, str]] = []
    calibrate(cfg, progress=lambda d, t, m: calls.append((d, t, m)))
    assert calls[0] == (1, 2, "resumed") and [c[0] for c in calls] == [1, 2]  # one batch run, not two
    assert not partial_path(out).exists()
    resumed = calibfile.load(out)
    straight = calibfile.load(calibrate(_cfg(tiny_model_dir, tmp_path / "straight.json",
                                             recipe=Recipe(smoothquant=False))))
    assert resumed.activations == pytest.approx(straight.activations)


def test_fp8_level4_records_attention_inputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    from trtkit.cli import main

    out = tmp_path / "fp8.json"
    rc = main(["calibrate", str(tiny_model_dir), "--fp8", "--num-prompts", "1", "--steps", "2", "--batch", "1",
               "--height", "64", "--width", "64", "--device", "cpu", "-o", str(out)])
    assert rc == 0
    cal = load_for_model(out, tiny_model_dir)
    assert cal.precision == "fp8" and not cal.smooth and cal.settings["level"] == 4.0
    assert cal.settings["reduction"] == "max" and cal.settings["percentile"] == 1.0  # the FP8 default recipe
    soft = [k for k in cal.activations if k.endswith(".softmax")]
    assert soft and all(0 < cal.activations[k] <= 1.0 for k in soft)
    assert any(k.endswith(".attn1.q_bmm") for k in cal.activations)


@pytest.mark.parametrize(("args", "needle"), [
    (["--int8", "--fp8"], "choose one of --int8 and --fp8, not both"),
    (["--fp8", "--smoothquant"], "SmoothQuant is for INT8"),
    (["--reduction", "median"], "reduction 'median'"),
    (["--level", "5"], "level 5"),
    (["--prompts", "/nonexistent/prompts.txt"], "does not exist"),
])
def test_cli_errors(tiny_model_dir: Path, tmp_path: Path, args: list[str], needle: str,
                    capsys: pytest.CaptureFixture[str]) -> None:
    from trtkit.cli import main

    out = tmp_path / "c.json"
    rc = main(["calibrate", str(tiny_model_dir), *args, "-o", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert not out.exists()


def test_not_a_pipeline_folder(tmp_path: Path) -> None:
    with pytest.raises(TrtkitError, match="not a diffusers pipeline folder"):
        calibrate(_cfg(tmp_path, tmp_path / "c.json"))


def test_default_recipe() -> None:
    r = Recipe().resolved()
    assert (r.precision, r.level, r.percentile, r.reduction, r.smoothquant) == ("int8", 3.0, 1.0, "mean", False)
    fp8 = Recipe(precision="fp8").resolved()
    assert (fp8.level, fp8.reduction, fp8.smoothquant) == (4.0, "max", False)
    fixed = Recipe(alpha=0.8).resolved()  # a fixed alpha asks for SmoothQuant
    assert fixed.smoothquant and fixed.alpha == 0.8
    with pytest.raises(TrtkitError, match="alpha"):
        Recipe(alpha=1.5).resolved()
