from __future__ import annotations

from pathlib import Path

import typer

from trtkit.cli._common import console


def register(app: typer.Typer) -> None:
    @app.command("refit")
    def refit(
        plan: Path = typer.Argument(..., help="A plan built with `trtkit build --refittable` (its .json beside it)."),
        lora: Path = typer.Option(..., "--lora", help="LoRA safetensors (diffusers/PEFT or kohya keys)."),
        scale: float = typer.Option(1.0, "--scale", help="LoRA strength (diffusers' lora_scale)."),
        base: Path = typer.Option(None, "--base", help="The float ONNX the weights start from (default: the ONNX the "
                                  "plan was built from; required for 8-bit engines)."),
        output: Path = typer.Option(None, "--output", "-o", help="The refit plan (default: <plan>-lora.plan); a "
                                    ".safetensors name writes the weights file instead (no GPU needed), which "
                                    "`trtkit run --engines DIR --lora FILE` applies at load."),
        skip_text_encoder: bool = typer.Option(False, "--skip-text-encoder", help="Leave out the adapter's "
                                               "text-encoder layers (the engine is the UNet)."),
    ) -> None:
        """Apply a LoRA to a refittable UNet engine without a rebuild (TensorRT's Refitter)."""
        import json

        from trtkit._files import check_input, check_output, write_text_atomic
        from trtkit.builder import metadata as md
        from trtkit.builder.refit import refit_weights
        from trtkit.errors import TrtkitError

        check_input(plan, "plan")
        check_input(lora, "LoRA file")
        meta = md.read_metadata(plan.with_suffix(".json"))
        if meta is None:
            raise TrtkitError(f"{plan.with_suffix('.json')} (the plan's metadata) is missing or not "
                              "trtkit's; refit needs it")
        to_file = output is not None and output.suffix == ".safetensors"
        out = check_output(output or plan.with_name(plan.stem + "-lora.plan"), inputs=[plan, lora, base],
                           sidecars=None if to_file else (lambda p: [p.with_suffix(".json")]),
                           what="weights file" if to_file else "plan")
        r = refit_weights(meta, lora, scale, base, skip_text_encoder)
        info = {"file": str(lora.resolve()), "scale": scale, "base": str(r.base), "weights": len(r.weights),
                "plan": plan.name}
        if to_file:
            from trtkit.runtime.refit import write_weights

            write_weights(out, r.weights, info)
            console.print(f"wrote {len(r.weights)} weights ({r.layers} LoRA layers, scale {scale}) -> {out}; "
                          f"apply with `trtkit run --engines {plan.parent} --lora {out}`")
            return
        from trtkit.backend import load_backend
        from trtkit.runtime.refit import refit_plan

        backend = load_backend((meta.get("backend") or {}).get("name"))
        n = refit_plan(backend, plan, r.weights, out)
        meta = dict(meta, lora=dict(info, weights=n), plan=dict(meta.get("plan") or {}, path=out.name))
        write_text_atomic(out.with_suffix(".json"), json.dumps(meta, indent=2))
        console.print(f"refit {n} weights ({r.layers} LoRA layers, scale {scale}) -> {out}")
