from __future__ import annotations

from pathlib import Path

import typer

from trtkit.cli._common import console, step_progress
from trtkit.errors import TrtkitError


def check_hub_id(model: str) -> None:
    """A model that is not a local folder comes from the Hugging Face Hub: where the Hub cannot be reached
    and the model is not in the local cache, say so at once (huggingface_hub retries for ~30 s, then
    reports a misleading "does not appear to have a file named config.json")."""
    import os
    import socket
    from urllib.parse import urlparse

    if Path(model).exists() or model.count("/") != 1 or model.startswith((".", "/")):
        return  # a folder, or not a hub id (the exporter gives its own one-line error)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(model, local_files_only=True)
        os.environ["HF_HUB_OFFLINE"] = "1"  # cached: use it without asking the network
        return
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and kin)
        pass
    fix = (f"download it where there is a network (huggingface-cli download {model} --local-dir DIR) and pass "
           "the folder")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise TrtkitError(f"{model} is not a local folder, HF_HUB_OFFLINE is set and it is not in the Hugging "
                          f"Face cache; {fix}")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a proxy decides; a direct probe would not tell
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise TrtkitError(f"{model} is not a local folder and the Hugging Face Hub ({host}) cannot be reached "
                          f"({e.strerror or e}); {fix}") from e


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="A diffusers pipeline folder (or a hub id where a network exists)."),
        component: str = typer.Option("unet", "--component", "-c", help="unet, vae_decoder, text_encoder, text_encoder_2 (CLIP; "
                                       "T5 in a FLUX folder), transformer (FLUX.1 / SD3.x), text_encoder_3 (SD3's T5), "
                                       "controlnet (controlnet_1, ... for further ControlNets of the folder)."),
        profile: str = typer.Option("sdxl-1024", "--profile", "-p", help="Shape profile (see `trtkit profiles`)."),
        shapes: str = typer.Option(None, "--shapes", help="trtexec-style overrides, e.g. sample:2x4x128x128."),
        out_dir: Path = typer.Option(Path("onnx"), "--output", "-o", help="Output folder."),
        opset: int = typer.Option(19, "--opset", help="ONNX opset (FP8 Q/DQ needs 19)."),
        check: bool = typer.Option(True, "--check/--no-check", help="Compare onnxruntime against torch on the opt shapes."),
        external_data: bool = typer.Option(None, "--external-data/--no-external-data",
                                           help="Weights in a .data file (default: only past 2 GB)."),
        dtype: str = typer.Option("float32", "--dtype", help="Weights' dtype: float32, or float16 / bfloat16 for a "
                                  "model too large to export in FP32 (a FLUX transformer: 48 GB in FP32)."),
    ) -> None:
        """Export one component of a diffusers folder to ONNX, checked against torch."""
        from trtkit.exporter import ExportConfig
        from trtkit.exporter import export as do_export

        check_hub_id(str(model_dir))

        cfg = ExportConfig(model_dir=model_dir, component=component, profile=profile, out_dir=out_dir,
                           opset=opset, shapes=shapes, check=check, external_data=external_data, dtype=dtype)
        with step_progress(f"export {component}") as step:
            r = do_export(cfg, progress=step)
        console.print(f"wrote {r.path}" + (f" (+ {r.external_data.name})" if r.external_data else "")
                      + f" in {r.seconds:.1f} s")
        if r.max_abs_err is not None:
            console.print(f"check vs torch on opt shapes: max abs error {r.max_abs_err:.3g}, "
                          f"max relative error {r.max_rel_err:.3g}")
        for note in r.notes:
            console.print(f"note: {note}")
