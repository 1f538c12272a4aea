"""`trtkit calibrate --from-modelopt / --to-modelopt`: the two conversions (trtkit.calibration.modelopt_state)."""

from __future__ import annotations

from pathlib import Path

from trtkit.cli._common import console
from trtkit.errors import TrtkitError


def convert(from_modelopt: Path | None, to_modelopt: Path | None, model_dir: Path | None, out: Path,
            precision: str | None) -> None:
    from trtkit.calibration import modelopt_state

    if from_modelopt is not None and to_modelopt is not None:
        raise TrtkitError("--from-modelopt and --to-modelopt exclude each other")
    if from_modelopt is not None:
        if out.resolve() == from_modelopt.resolve():
            raise TrtkitError("the output path is the ModelOpt state itself; choose another -o")
        path = modelopt_state.convert_to_calib(from_modelopt, out, precision, model_dir)
        from trtkit import calibfile

        cal = calibfile.load(path)
        console.print(f"wrote {path} ({cal.precision}, {len(cal.activations)} activation ranges from ModelOpt "
                      f"{cal.settings.get('modelopt_version') or ''})".replace(" )", ")"))
        return
    assert to_modelopt is not None
    dest = Path("modelopt_amax.pt") if out == Path("calib.json") else out
    if dest.resolve() == to_modelopt.resolve():
        raise TrtkitError("the output path is the calibration file itself; choose another -o")
    path = modelopt_state.convert_to_modelopt(to_modelopt, dest, model_dir)
    console.print(f"wrote {path} (ModelOpt quantizer state dict; load it with "
                  "modelopt.torch.quantization.utils.set_quantizer_state_dict after mtq.quantize)")
