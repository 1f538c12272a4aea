from __future__ import annotations

from pathlib import Path

import typer

from trtkit.cli._common import console, err_console, print_json


def family_mismatch(profile: str, sdxl_model: bool) -> str | None:
    """A profile named for SD 1.x/2.x used with an SDXL UNet, or the other way round."""
    if profile.startswith(("sd15", "sd21")) and sdxl_model:
        return (f"profile {profile} is named for SD 1.x/2.x, but the model is an SDXL UNet (text_embeds, "
                "time_ids): these are its shapes at that resolution; an sdxl-* profile is the usual choice")
    if profile.startswith("sdxl") and not sdxl_model:
        return (f"profile {profile} is named for SDXL, but the model is an SD 1.x/2.x UNet (no text_embeds): "
                "these are its shapes at that resolution; an sd15-*/sd21-* profile is the usual choice")
    return None


def register(app: typer.Typer) -> None:
    @app.command("profiles")
    def profiles(
        name: str = typer.Argument(None, metavar="PROFILE", help="Show one profile's shapes in full."),
        model: Path = typer.Option(None, "--model", "-m", help="A diffusers folder: shapes from its config."),
        component: str = typer.Option("unet", "--component", "-c", help="unet, vae_decoder, text_encoder, "
                                     "text_encoder_2 or controlnet (controlnet_1, ...)."),
        static: bool = typer.Option(False, "--static", help="Fix resolution and batch at the opt values."),
        as_json: bool = typer.Option(False, "--json", help="Print the profiles or shapes as JSON."),
    ) -> None:
        """List the named shape profiles, or one profile's min/opt/max shapes for a model."""
        from rich.table import Table

        from trtkit.profiles import PROFILES, ModelDims, fmt_dims, get_profile

        if name is None:
            if as_json:
                print_json({p.name: {"summary": p.summary(), "description": p.description} for p in PROFILES.values()})
                return
            t = Table("profile", "shapes", "what for")
            for p in PROFILES.values():
                t.add_row(p.name, p.summary(), p.description)
            console.print(t)
            return
        prof = get_profile(name)
        prof = prof.with_static() if static else prof
        dims = ModelDims.from_folder(model) if model else ModelDims.from_configs(
            {"in_channels": 4, "cross_attention_dim": 2048, "addition_embed_type": "text_time",
             "projection_class_embeddings_input_dim": 2816, "addition_time_embed_dim": 256,
             "down_block_types": [0, 0, 0]}, {"block_out_channels": [0, 0, 0, 0]})
        from trtkit.exporter_controlnet import is_controlnet, spec_of
        from trtkit.profiles_controlnet import ControlNetSpec
        from trtkit.profiles_controlnet import shapes as cn_shapes

        # a ControlNet, or the UNet of a ControlNet folder (residual inputs); without a model, SDXL base's layout
        spec = spec_of(model, component) if model else (
            ControlNetSpec.from_unet_config({"block_out_channels": [320, 640, 1280]}) if is_controlnet(component) else None)
        if spec is not None:
            shapes = cn_shapes(prof, "controlnet" if is_controlnet(component) else "unet", dims, spec)
        else:
            shapes = prof.shapes(component, dims)
        warning = family_mismatch(prof.name, dims.text_embeds_dim is not None) if model else None
        if warning:
            err_console.print(f"warning: {warning}", markup=False)
        if as_json:
            print_json({k: v.to_json() for k, v in shapes.items()})
            return
        t = Table("input", "min", "opt", "max", title=f"{prof.name} / {component}"
                  + ("" if model else " (SDXL base sizes; pass --model for yours)"))
        for k, v in shapes.items():
            t.add_row(k, fmt_dims(v.min), fmt_dims(v.opt), fmt_dims(v.max))
        console.print(t)
