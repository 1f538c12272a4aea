"""`calibrate(cfg) -> Path`: run the diffusers pipeline over calibration prompts with hooks on every
quantized input, then reduce the per-step statistics into a trtkit calibration file.

Resumable: after each prompt batch the raw statistics go atomically to `<out>.partial.npz`; a rerun
with the same model, prompts and recording settings continues after the last saved batch. The
reduction settings (percentile, reduction, SmoothQuant, alpha) are applied at the end only, so they
may change between an interrupted run and its continuation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trtkit._quiet import quiet_loading
from trtkit.calibfile import Calibration
from trtkit.errors import TrtkitError

log = logging.getLogger(__name__)

NEGATIVE_PROMPT = "normal quality, low quality, worst quality, low res, blurry, nsfw, nude"  # demoDiffusion's
PRECISIONS = ("int8", "fp8")


@dataclass(frozen=True)
class Recipe:
    """How per-step statistics become ranges.

    The defaults are trtkit's recipe, the modes closest to FP32 in the digits quality benchmark
    (docs/benchmarks.md, "Calibration quality"): all steps; INT8: `mean` reduction (ModelOpt's mean-max), no
    SmoothQuant; FP8: `max`.
    """

    precision: str = "int8"
    level: float | None = None  # None: 3 for INT8, 4 for FP8 (demoDiffusion's defaults)
    percentile: float = 1.0
    reduction: str | None = None  # None: "mean" for INT8, "max" for FP8
    smoothquant: bool | None = None  # None: off (the benchmark measured it no closer to FP32); INT8 only
    alpha: float | None = None  # None: searched per layer on smoothquant.ALPHAS

    def resolved(self) -> Recipe:
        from trtkit.calibration import levels, percentile

        if self.precision not in PRECISIONS:
            raise TrtkitError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        reduction = self.reduction or ("mean" if self.precision == "int8" else "max")
        percentile.check(self.percentile, reduction)
        level = levels.check_level(self.level if self.level is not None else
                                   (3.0 if self.precision == "int8" else 4.0))
        sq = bool(self.smoothquant) or (self.smoothquant is None and self.alpha is not None)
        if sq and self.precision != "int8":
            raise TrtkitError("SmoothQuant is for INT8 linear layers; use --no-smoothquant with --fp8")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise TrtkitError(f"--alpha {self.alpha} is not in [0, 1]")
        return Recipe(self.precision, level, self.percentile, reduction, sq, self.alpha)


@dataclass(frozen=True)
class CalibrateConfig:
    model_dir: Path
    out: Path = Path("calib.json")
    prompts: Path | None = None  # None: the built-in prompt file
    num_prompts: int = 32
    steps: int = 30
    batch: int = 2
    recipe: Recipe = Recipe()
    height: int | None = None  # None: the UNet's sample_size x the VAE factor
    width: int | None = None
    guidance_scale: float | None = None  # None: the pipeline's default
    seed: int = 0
    device: str | None = None  # None: cuda where there is one, else cpu
    sample_rows: int = 128  # activation rows kept per linear layer for the alpha search


# -- reduction: statistics -> calibration ---------------------------------------------------------


def build_calibration(stats: Any, model: Any, recipe: Recipe, model_info: dict[str, Any] | None = None,
                      run: dict[str, Any] | None = None) -> Calibration:
    """Reduce StepStats into a Calibration (Percentile Quant per input, SmoothQuant per INT8 linear)."""


    r = recipe.resolved()
    with _one_thread():
        return _build(stats, model, r, model_info, run)


def _one_thread():  # type: ignore[no-untyped-def]
    """The alpha search is thousands of tiny CPU matmuls: one thread avoids OpenMP spin on busy machines."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx():  # type: ignore[no-untyped-def]
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    return ctx()


def _build(stats: Any, model: Any, r: Recipe, model_info: dict[str, Any] | None,
           run: dict[str, Any] | None) -> Calibration:
    import numpy as np

    from trtkit.calibration import percentile as pq
    from trtkit.calibration import smoothquant as sq

    assert r.reduction is not None  # resolved
    modules = dict(model.named_modules())
    cal = Calibration(precision=r.precision, model=model_info or {}, run=run or {})
    sq_report: dict[str, Any] = {}
    for key in sorted(stats.amax):
        table = stats.amax[key]
        if r.smoothquant and key in stats.chan and key in stats.sample:
            chan = stats.chan[key]  # [steps, C]
            ch_all = chan.max(0)

            def amax_for(s, table=table, chan=chan):  # type: ignore[no-untyped-def]
                if s is None:
                    return pq.reduce(table, r.percentile, r.reduction)
                # post-smoothing range per (pass, step): the table scaled by how much dividing by s
                # shrinks that step's range (exact for the max-over-passes reductions; see docs)
                ratio = (chan / s).max(1) / np.maximum(chan.max(1), 1e-30)
                return pq.reduce(table * ratio[None, :], r.percentile, r.reduction)

            res = sq.search(stats.sample[key], modules[key].weight, ch_all, amax_for, fixed=r.alpha)
            sq_report[key] = {"alpha": res.alpha, "error": res.error, "error_unsmoothed": res.error_unsmoothed}
            if res.smooth is not None:
                cal.smooth[key] = res.smooth.astype(np.float32)
                cal.alphas[key] = float(res.alpha)  # type: ignore[arg-type]
                cal.activations[key] = amax_for(res.smooth)
                continue
        cal.activations[key] = pq.reduce(table, r.percentile, r.reduction)
    bad = [k for k, v in cal.activations.items() if not (v > 0 and np.isfinite(v))]
    for k in bad:  # an input that is identically zero has no range; leave it unquantized
        del cal.activations[k]
        cal.smooth.pop(k, None)
        cal.alphas.pop(k, None)
    cal.settings = {"method": "percentile", "percentile": r.percentile, "reduction": r.reduction,
                    "level": r.level, "smoothquant": bool(r.smoothquant),
                    "alpha": r.alpha if r.alpha is not None else "search",
                    "alpha_grid": list(sq.ALPHAS) if r.smoothquant and r.alpha is None else None,
                    "min_mean_divisor": "passes", "passes": stats.passes, "steps_recorded": stats.steps,
                    "steps_used": pq.steps_used(stats.steps, r.percentile),
                    "unquantized_zero_inputs": sorted(bad)}
    if sq_report:
        cal.settings["smoothquant_search"] = sq_report
    return cal


def recorder(model: Any, recipe: Recipe, steps: int, sample_rows: int = 128, seed: int = 0,  # type: ignore[no-untyped-def]
             dit: bool = False):
    """(StepStats, targets) for `model` under `recipe` (use with hooks.tapped(model, targets, stats.observe),
    or hooks_dit.tapped_dit for a DiT transformer, `dit=True`)."""
    from trtkit.calibration import levels
    from trtkit.calibration.stats import StepStats

    r = recipe.resolved()
    assert r.level is not None  # resolved
    if dit:
        from trtkit.calibration import dit as dit_rules

        targets = dit_rules.targets(model, r.precision, r.level)
    else:
        targets = levels.targets(model, r.level)
    if r.precision != "fp8":  # NVIDIA's INT8 config has no BMM quantizers; the graph pass agrees
        targets = {k: v for k, v in targets.items() if v != "attention"}
    linear = {k for k, v in targets.items() if v == "linear"} if r.precision == "int8" else set()
    return StepStats(steps, linear, sample_rows=sample_rows, seed=seed), targets


# -- the pipeline run --------------------------------------------------------------------------------


def read_prompts(path: Path | None, n: int) -> list[str]:
    if path is None:
        from importlib import resources

        text = resources.files("trtkit.calibration").joinpath("prompts.txt").read_text()
        where = "the built-in prompt file"
    else:
        from trtkit._files import check_input

        p = check_input(path, "prompt file")
        text, where = p.read_text(encoding="utf-8", errors="replace"), str(p)
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise TrtkitError(f"{where} has no prompts (one per line)")
    if n < 1:
        raise TrtkitError(f"--num-prompts must be at least 1, not {n}")
    return prompts[:n]


def model_info(model_dir: Path) -> dict[str, Any]:
    from trtkit.calibration.dit import component

    comp = component(model_dir)
    cfg = json.loads((Path(model_dir) / comp / "config.json").read_text())
    from trtkit.calibfile import unet_config_hash

    return {"source": str(Path(model_dir).resolve()), "class": cfg.get("_class_name", "UNet2DConditionModel"),
            "component": comp, "config_hash": unet_config_hash(cfg)}


def unet_module_names(model_dir: Path) -> set[str]:
    """Module names of a folder's UNet, built on the meta device (no weights read)."""
    import torch
    from diffusers import UNet2DConditionModel

    cfg_path = Path(model_dir) / "unet" / "config.json"
    if not cfg_path.is_file():
        raise TrtkitError(f"{model_dir} has no unet/config.json: not a diffusers pipeline folder")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(cfg_path.read_text()))
    return {n for n, _ in unet.named_modules()}


def load_for_model(calib_path: Path, model_dir: Path) -> Calibration:
    """Load a calibration file and check that every module it names exists in the model's UNet (or DiT
    transformer)."""
    from trtkit import calibfile
    from trtkit.calibration import dit

    cal = calibfile.load(calib_path)
    comp = dit.component(model_dir)
    where = f"the {'UNet' if comp == 'unet' else 'transformer'} of {model_dir}"
    calibfile.check_model(cal, model_dir, where=where)
    cal.check_modules(unet_module_names(model_dir) if comp == "unet" else dit.module_names(model_dir), where=where)
    return cal


def pipeline_files(model_dir: Path) -> list[Path]:
    """The files a pipeline load reads: model_index.json and every file of its component folders (a
    calibration file may go beside them, never onto them)."""
    subdirs = [d for d in model_dir.iterdir() if d.is_dir()] if model_dir.is_dir() else []
    return [model_dir / "model_index.json", *(f for d in subdirs for f in d.rglob("*") if f.is_file())]


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.npz")


def calibrate(cfg: CalibrateConfig, progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Calibrate cfg.model_dir's UNet (or DiT transformer: FLUX.1, SD3.x) and write cfg.out (+ .safetensors with SmoothQuant vectors)."""
    from trtkit import calibfile
    from trtkit._files import check_output

    recipe = cfg.recipe.resolved()
    if cfg.steps < 1 or cfg.batch < 1:
        raise TrtkitError("--steps and --batch must be at least 1")
    model_dir = Path(cfg.model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise TrtkitError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json)")
    from trtkit.calibration import dit

    is_dit = dit.component(model_dir) == "transformer"  # FLUX.1 / SD3.x: calibration/dit.py
    from trtkit.calibration import controlnet as cnc
    from trtkit.exporter_controlnet import controlnet_folders

    names = controlnet_folders(model_dir)  # each ControlNet: its own file beside the UNet's (calibration/controlnet.py)
    if is_dit and names:  # the ControlNet taps and inputs are the UNet ControlNet's (calibration/controlnet.py)
        raise TrtkitError(f"{model_dir} is a DiT pipeline with a ControlNet; `trtkit calibrate` calibrates "
                          "ControlNets of UNet pipelines only")

    def sidecars(o: Path) -> list[Path]:
        files = [o, *(cnc.calib_path(o, n) for n in names)]
        return [*files[1:], *(x for f in files for x in (f.with_suffix(".safetensors"), partial_path(f)))]

    out = check_output(cfg.out, default_name="calib.json", what="calibration file",
                       inputs=[*pipeline_files(model_dir), cfg.prompts], sidecars=sidecars)
    prompts = read_prompts(cfg.prompts, cfg.num_prompts)
    batches = [prompts[i: i + cfg.batch] for i in range(0, len(prompts), cfg.batch)]
    import torch  # after the checks above: they fail in a blink, the imports take seconds

    from trtkit.calibration.hooks import tapped
    from trtkit.calibration.stats import StepStats

    tap_context = dit.tapped if is_dit else tapped

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # FLUX.1's activations overflow FP16 (diffusers runs it in BF16): DiTs calibrate in BF16 on a GPU
    half = torch.bfloat16 if is_dit else torch.float16
    dtype = half if device.startswith("cuda") else torch.float32
    from diffusers import DiffusionPipeline

    try:
        # torch_dtype only where needed: newer diffusers warn on it, and float32 is the default
        extra = {"torch_dtype": dtype} if dtype != torch.float32 else {}
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(str(model_dir), **extra)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds; the user needs one line
        raise TrtkitError(f"cannot load the pipeline in {model_dir}: {str(e).splitlines()[0]}") from e
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.transformer if is_dit else pipe.unet  # the denoiser calibrated
    info = model_info(model_dir)
    vae_factor = getattr(pipe, "vae_scale_factor", 8)
    native = dit.default_size(pipe) if is_dit else unet.config.sample_size * vae_factor
    height = cfg.height or native
    width = cfg.width or native
    record = {"model": info["config_hash"], "prompts": prompts, "steps": cfg.steps, "batch": cfg.batch,
              "precision": recipe.precision, "level": recipe.level, "height": height, "width": width,
              "guidance_scale": cfg.guidance_scale, "seed": cfg.seed, "sample_rows": cfg.sample_rows,
              "device_dtype": str(dtype), **({"controlnets": names} if names else {})}

    side = partial_path(out)
    stats, targets = recorder(unet, recipe, cfg.steps, cfg.sample_rows, cfg.seed, dit=is_dit)
    cns = cnc.nets(pipe)
    if len(cns) != len(names):
        raise TrtkitError(f"{model_dir} has {len(names)} ControlNet folder(s) but its pipeline loads {len(cns)}")
    cn_rec = [recorder(net, recipe, cfg.steps, cfg.sample_rows, cfg.seed) for net in cns]
    cn_sides = [partial_path(cnc.calib_path(out, n)) for n in names]
    done = 0
    resumable = all(f.is_file() for f in cn_sides)
    if side.is_file() and resumable:
        try:
            old, meta = StepStats.load(side, seed=cfg.seed)
        except Exception as e:  # noqa: BLE001 - a damaged side file just means starting over
            log.warning("ignoring unreadable partial statistics %s (%s)", side, e)
        else:
            if meta.get("record") == record:
                stats, done = old, int(meta["done_batches"])
                for i, f in enumerate(cn_sides):  # the ControlNets' statistics of the same batches, or start over
                    try:
                        cn_old, cn_meta = StepStats.load(f, seed=cfg.seed)
                    except Exception:  # noqa: BLE001 - damaged: start over, as for the UNet's
                        cn_old, cn_meta = None, {}
                    if cn_meta.get("record") != record or int(cn_meta.get("done_batches", -1)) != done:
                        stats, done = recorder(unet, recipe, cfg.steps, cfg.sample_rows, cfg.seed, dit=is_dit)[0], 0
                        cn_rec = [recorder(net, recipe, cfg.steps, cfg.sample_rows, cfg.seed) for net in cns]
                        break
                    cn_rec[i] = (cn_old, cn_rec[i][1])
                log.info("resuming calibration after %d of %d prompt batches", done, len(batches))
            else:
                log.warning("partial statistics %s are for other settings; starting over", side)

    kwargs: dict[str, Any] = {"num_inference_steps": cfg.steps, "height": height, "width": width,
                              "output_type": "latent"}
    if cfg.guidance_scale is not None:
        kwargs["guidance_scale"] = cfg.guidance_scale
    kwargs.update(cnc.pipeline_kwargs(names, height, width))

    def on_step_end(_pipe, i, _t, cb_kwargs):  # type: ignore[no-untyped-def]
        for st in (stats, *(r[0] for r in cn_rec)):
            st.step = i + 1
        return cb_kwargs

    if progress:
        progress(done, len(batches), "resumed" if done else "started")
    import contextlib

    with torch.no_grad(), tap_context(unet, targets, stats.observe), contextlib.ExitStack() as taps:
        for net, (st, tg) in zip(cns, cn_rec, strict=True):
            taps.enter_context(tapped(net, tg, st.observe))
        for bi in range(done, len(batches)):
            batch = batches[bi]
            for st in (stats, *(r[0] for r in cn_rec)):
                st.begin_pass()
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed + bi)
            prompt_kw = (dit.call_kwargs(pipe, batch, NEGATIVE_PROMPT) if is_dit else
                         {"prompt": batch, "negative_prompt": [NEGATIVE_PROMPT] * len(batch)})
            pipe(generator=gen, callback_on_step_end=on_step_end, **prompt_kw, **kwargs)
            stats.save(side, {"record": record, "done_batches": bi + 1})
            for (st, _), f in zip(cn_rec, cn_sides, strict=True):
                st.save(f, {"record": record, "done_batches": bi + 1})
            if progress:
                progress(bi + 1, len(batches), batch[0])

    run = {"prompts": prompts, "num_prompts": len(prompts), "steps": cfg.steps, "batch": cfg.batch,
           "scheduler": type(pipe.scheduler).__name__, "height": height, "width": width,
           "guidance_scale": cfg.guidance_scale if cfg.guidance_scale is not None else "pipeline default",
           "negative_prompt": None if is_dit and "negative_prompt" not in dit.call_kwargs(pipe, [""], "")
           else NEGATIVE_PROMPT, "seed": cfg.seed, "device": device, "dtype": str(dtype)}
    cal = build_calibration(stats, unet, recipe, info, run)
    cal.settings["recipe"] = asdict(recipe)  # resolved: the defaults filled in
    for name, net, (st, _) in zip(names, cns, cn_rec, strict=True):
        cn_cal = build_calibration(st, net, recipe, cnc.model_info(model_dir, name), run)
        cn_cal.settings["recipe"] = asdict(recipe)
        calibfile.save(cn_cal, cnc.calib_path(out, name))
    calibfile.save(cal, out)
    side.unlink(missing_ok=True)
    for f in cn_sides:
        f.unlink(missing_ok=True)
    return out
