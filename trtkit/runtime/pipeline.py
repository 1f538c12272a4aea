"""Text -> image through the runtime: text encoders and VAE from the diffusers folder (torch), the UNet
from `engines/unet.plan` (TensorRT) when given, else the torch UNet; the denoising loop on the
LoopRunner (one CUDA graph on a GPU, the eager numpy-reference loop on a CPU).

The torch stages around the loop (loading, text encoding, seeded draws) are in torch_stages.py, the VAE side in
decoding.py; their names are re-exported here, where callers have always imported them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtkit.errors import TrtkitError
from trtkit.runtime.decoding import decode as decode
from trtkit.runtime.decoding import decode_raw as decode_raw
from trtkit.runtime.decoding import vae_input
from trtkit.runtime.executors import (
    LoopShape,
    StepExecutor,
    TensorRTExecutor,
    TorchExecutor,
    describe_options,
    kernel_options,
)
from trtkit.runtime.graph_runner import LoopRunner
from trtkit.runtime.schedulers import (
    StepTables,
    make_tables,
    switch_scheduler,
    unsupported_reason,
)
from trtkit.runtime.torch_stages import default_device as default_device
from trtkit.runtime.torch_stages import encode as encode
from trtkit.runtime.torch_stages import initial_latents as initial_latents
from trtkit.runtime.torch_stages import is_sdxl as is_sdxl
from trtkit.runtime.torch_stages import load_pipeline as load_pipeline
from trtkit.runtime.torch_stages import seeded_draws as seeded_draws
from trtkit.runtime.torch_stages import unet_config as unet_config

SD_GUIDANCE = 7.5  # `trtkit run`'s CFG scale for SD / SDXL folders where --guidance is not given


@dataclass(frozen=True)
class RunConfig:
    model_dir: Path
    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    guidance: float | None = None  # None: the pipeline's default (SD_GUIDANCE; FLUX.1 / SD3: diffusers')
    scheduler: str | None = None  # None: the folder's scheduler
    seed: int = 0
    height: int | None = None
    width: int | None = None
    cuda_graph: bool = True
    engines: Path | None = None
    trust_engine: bool = False
    device: str | None = None  # None: cuda if present
    compile: bool = False
    kernels: str = "tuned"  # torch UNet kernel choices on a GPU (executors.KERNEL_PRESETS)
    backend: str | None = None  # None: the backend that built each plan (its header)
    lora: Path | None = None  # torch UNet: an adapter diffusers loads and fuses at lora_scale (runtime/lora.py)
    lora_scale: float = 1.0
    unet_weights: dict[str, Any] | None = None  # engines: refit weights set at load (runtime/refit.py)


@dataclass
class RunResult:
    image: Any  # PIL image
    latents: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)
    executor: str = ""
    cuda_graph: bool = False
    path: Path | None = None  # where run() saved the image (a folder given as output: out.png in it)


class EngineEncoders:
    """Text encoders and VAE decoder from TensorRT engines (`text_encoder.plan`, `text_encoder_2.plan`,
    `vae_decoder.plan` beside unet.plan), numpy in and out; tokenizers and configs from the diffusers folder.
    Each component without a plan stays in torch."""

    def __init__(self, pipe: Any, engines: dict[str, Any], stream: Any, unet_cfg: Any = None) -> None:
        self.pipe, self.engines, self.stream = pipe, engines, stream
        self.unet_cfg = unet_cfg if unet_cfg is not None else pipe.unet.config

    def has_text(self) -> bool:
        need = ["text_encoder"] + (["text_encoder_2"] if is_sdxl(self.pipe, self.unet_cfg) else [])
        return all(n in self.engines for n in need)

    def _ids(self, tokenizer: Any, prompt: list[str]) -> np.ndarray:
        return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="np").input_ids.astype(np.int32)

    def _run(self, name: str, tokenizer: Any, texts: list[str], outputs: list[str]) -> dict[str, np.ndarray]:
        from trtkit.runtime.components import check_encoder

        ids = self._ids(tokenizer, texts)
        check_encoder(self.engines[name].desc, {"input_ids": ids.shape}, outputs)
        return self.engines[name].infer({"input_ids": ids}, self.stream.handle)

    def encode(self, prompt: str, negative: str, cfg: bool, height: int, width: int) -> tuple[dict, LoopShape]:
        """ONE call per text encoder: [negative; prompt] (batch 2) with guidance, [prompt] without (finding 1)."""
        from trtkit.runtime.components import encoder_texts

        p = self.pipe
        sdxl = is_sdxl(p, self.unet_cfg)
        zero_neg = cfg and sdxl and not negative and bool(getattr(p.config, "force_zeros_for_empty_prompt", False))
        texts = encoder_texts(prompt, negative, cfg, zero_neg)
        pooled: np.ndarray | None = None
        if sdxl:
            a = self._run("text_encoder", p.tokenizer, texts, ["penultimate_hidden_state"])
            b = self._run("text_encoder_2", p.tokenizer_2, texts, ["penultimate_hidden_state", "pooled_output"])
            emb = np.concatenate([a["penultimate_hidden_state"], b["penultimate_hidden_state"]], axis=-1)
            pooled = b["pooled_output"].astype(np.float32)
        else:
            emb = self._run("text_encoder", p.tokenizer, texts, ["last_hidden_state"])["last_hidden_state"]
        emb = emb.astype(np.float32)
        if zero_neg:  # diffusers' zero negative for SDXL's empty negative prompt
            emb = np.concatenate([np.zeros_like(emb), emb])
            pooled = None if pooled is None else np.concatenate([np.zeros_like(pooled), pooled])
        cond: dict[str, Any] = {"encoder_hidden_states": emb}
        if sdxl:
            cond["text_embeds"] = pooled
            cond["time_ids"] = np.repeat(np.array([[height, width, 0, 0, height, width]], np.float32), len(emb), 0)
        f = p.vae_scale_factor
        shape = LoopShape(batch=1, latent_channels=self.unet_cfg.in_channels, latent_height=height // f,
                          latent_width=width // f, cfg=cfg, text_len=emb.shape[1], text_dim=emb.shape[2],
                          pooled_dim=None if pooled is None else pooled.shape[-1], time_ids_dim=6 if sdxl else None)
        return cond, shape

    def decode(self, latents: np.ndarray) -> Any:
        from PIL import Image

        z = vae_input(latents, self.pipe.vae.config, is_sdxl(self.pipe, self.unet_cfg))
        from trtkit.runtime.components import check_vae

        check_vae(self.engines["vae_decoder"].desc, tuple(z.shape))
        img = self.engines["vae_decoder"].infer({"latent": z.astype(np.float32)}, self.stream.handle)["images"]
        img = np.clip(img.astype(np.float32) / 2 + 0.5, 0, 1)
        return Image.fromarray((img[0].transpose(1, 2, 0) * 255).round().astype(np.uint8))


def make_executor(pipe: Any, engines: Path | None, trust_engine: bool, compile: bool, device: str,
                  kernels: str = "tuned", backend: str | None = None, unet_cfg: Any = None,
                  unet_weights: dict[str, Any] | None = None) -> StepExecutor:
    if engines is not None:
        # a folder holding unet.plan, or the plan itself
        plan = Path(engines) if Path(engines).suffix in (".plan", ".engine") else Path(engines) / "unet.plan"
        if not plan.is_file():
            raise TrtkitError(f"{engines} has no unet.plan")
        if device != "cuda":
            raise TrtkitError("TensorRT engines need a CUDA GPU; none found")
        from trtkit.runtime.components import check_unet
        from trtkit.runtime.engine import Engine

        engine = Engine.load(plan, trust_engine=trust_engine, backend=backend, refit=unet_weights)
        check_unet(engine.desc, is_sdxl(pipe, unet_cfg))
        return TensorRTExecutor(engine)
    return TorchExecutor(pipe.unet, compile=compile, **kernel_options(kernels, device, compile))


class Pipeline:
    """A loaded pipeline + executor + loop runner, reusable across prompts (graphs are kept)."""

    def __init__(self, model_dir: Path, engines: Path | None = None, device: str | None = None,
                 cuda_graph: bool = True, trust_engine: bool = False, compile: bool = False,
                 kernels: str = "tuned", backend: str | None = None, lora: Path | None = None,
                 lora_scale: float = 1.0, unet_weights: dict[str, Any] | None = None) -> None:
        from trtkit.runtime.components import check_unet, engine_files

        self.device = device or default_device()
        kernel_options(kernels, self.device, compile)  # a bad preset fails before the (slow) load
        if engines is not None and not (Path(engines).is_file() or (Path(engines) / "unet.plan").is_file()):
            raise TrtkitError(f"{engines} has no unet.plan")  # before the (slow) pipeline load
        names = engine_files(engines)
        if engines is not None:  # which TensorRT runs each plan: a one-line error now, before the (slow) load
            from trtkit.runtime.engine import plan_backend

            folder = Path(engines)
            for n in names:
                plan_backend(folder if folder.is_file() else folder / f"{n}.plan", backend)
        if engines is not None and self.device != "cuda":
            raise TrtkitError("TensorRT engines need a CUDA GPU; none found")
        self.pipe = load_pipeline(Path(model_dir), self.device, names)
        if lora is not None:  # before the executor: it fuses q/k/v from the weights it finds
            if engines is not None:
                raise TrtkitError("with --engines, a LoRA comes as refit weights (unet_weights), not as an adapter")
            from trtkit.runtime.lora import load_fused

            load_fused(self.pipe, lora, lora_scale)
        self.unet_config = unet_config(self.pipe, Path(model_dir))
        self.engines: dict[str, Any] = {}
        self.encoders: EngineEncoders | None = None
        if engines is not None and Path(engines).is_dir():
            from trtkit.runtime.engine import load_engines

            # every plan of the folder shares one activation area: they run one after another on one stream
            found = load_engines(engines, trust_engine=trust_engine, backend=backend,
                                 refit={"unet": unet_weights} if unet_weights else None)
            if "unet" not in found:
                raise TrtkitError(f"{engines} has no unet.plan")
            check_unet(found["unet"].desc, is_sdxl(self.pipe, self.unet_config))
            self.engines = found
            self.executor: StepExecutor = TensorRTExecutor(found["unet"])
            self.runner = LoopRunner(self.executor, device=self.device, use_graph=cuda_graph)
            self.encoders = EngineEncoders(self.pipe, found, self.runner.stream, self.unet_config)
        else:
            self.executor = make_executor(self.pipe, engines, trust_engine, compile, self.device, kernels, backend,
                                          self.unet_config, unet_weights)
            if isinstance(self.executor, TensorRTExecutor):  # the TensorRT UNet alone
                self.engines = {"unet": self.executor.engine}
            self.runner = LoopRunner(self.executor, device=self.device, use_graph=cuda_graph)

    def tables(self, scheduler: str | None, steps: int) -> StepTables:
        """Tables of the folder's scheduler instance as loaded (config patches included), or of diffusers'
        `from_config` switch to `scheduler` when that names another kind."""
        sch = switch_scheduler(self.pipe.scheduler, scheduler)
        reason = unsupported_reason(sch)
        if reason is not None:
            raise TrtkitError(reason, hint=None if scheduler else "--scheduler euler, euler_a, ddim or dpmpp_2m "
                              "switches from the folder's config")
        return make_tables(sch, steps)

    def __call__(self, cfg: RunConfig) -> RunResult:
        t0 = time.perf_counter()
        unet_cfg = self.unet_config
        f = self.pipe.vae_scale_factor
        height = unet_cfg.sample_size * f if cfg.height is None else cfg.height  # 0 is an error, not the default
        width = unet_cfg.sample_size * f if cfg.width is None else cfg.width
        if height <= 0 or width <= 0 or height % 8 or width % 8:
            raise TrtkitError(f"height and width must be positive multiples of 8, got {height}x{width}")
        g = SD_GUIDANCE if cfg.guidance is None else cfg.guidance
        use_cfg = g > 1.0
        tables = self.tables(cfg.scheduler, cfg.steps)
        if self.encoders is not None and self.encoders.has_text():
            cond, shape = self.encoders.encode(cfg.prompt, cfg.negative_prompt, use_cfg, height, width)
        else:
            cond, shape = encode(self.pipe, cfg.prompt, cfg.negative_prompt, use_cfg, height, width, self.device,
                                 unet_cfg)
        t1 = time.perf_counter()
        x, noise = seeded_draws(shape, tables, cfg.seed)
        lat = self.runner(shape, tables, x_init=x, guidance=g, noise=noise, **cond)
        t2 = time.perf_counter()
        if self.encoders is not None and "vae_decoder" in self.encoders.engines:
            image = self.encoders.decode(lat)
        else:
            image = decode(self.pipe, lat)[0][0]
        t3 = time.perf_counter()
        for e in self.engines.values():  # TensorRT-RTX: keep the kernels compiled by this first run
            e.save_runtime_cache()
        return RunResult(image=image, latents=lat, executor=self.executor.name, cuda_graph=self.runner.use_graph,
                         timings_ms={"encode": (t1 - t0) * 1e3, "denoise": (t2 - t1) * 1e3,
                                     "decode": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3})


def _open(cfg: RunConfig) -> Any:
    """The loaded pipeline for `cfg`: a FLUX / SD3 folder goes to pipeline_dit (accelerated diffusers pipeline)."""
    from trtkit.runtime.pipeline_dit import DitPipeline, check_call, is_dit_folder

    if is_dit_folder(cfg.model_dir):
        if cfg.lora is not None or cfg.unet_weights is not None:
            raise TrtkitError("--lora is for SD/SDXL UNet folders; FLUX/SD3 folders do not take it yet "
                              "(with or without --engines)")
        check_call(cfg.model_dir, cfg)
        return DitPipeline(cfg.model_dir, engines=cfg.engines, device=cfg.device, cuda_graph=cfg.cuda_graph,
                           compile=cfg.compile, trust_engine=cfg.trust_engine, backend=cfg.backend)
    return Pipeline(cfg.model_dir, engines=cfg.engines, device=cfg.device, cuda_graph=cfg.cuda_graph,
                    trust_engine=cfg.trust_engine, compile=cfg.compile, kernels=cfg.kernels, backend=cfg.backend,
                    lora=cfg.lora, lora_scale=cfg.lora_scale, unet_weights=cfg.unet_weights)


def run(cfg: RunConfig, output: Path | None = None) -> RunResult:
    """`trtkit run`: one image, saved atomically to `output` when given (a folder: `out.png` in it).
    The output is checked before the pipeline loads."""
    from trtkit._files import atomic_path, check_output

    if output is not None:
        output = check_output(output, default_name="out.png", what="image",
                              inputs=[Path(cfg.model_dir) / "model_index.json"])
        if output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            raise TrtkitError(f"output {output} must end in .png, .jpg or .webp")
    pipe = _open(cfg)
    res = pipe(cfg)
    if output is not None:
        with atomic_path(output) as tmp:
            res.image.save(tmp, format={".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(
                output.suffix.lower(), "PNG"))
        res.path = output
    return res


@dataclass(frozen=True)
class BenchResult:
    steps: int
    warmup: int
    repeats: int
    executor: str
    cuda_graph: bool
    device: str
    end_to_end_ms: list[float]
    denoise_ms: list[float]
    kernels: str = ""  # the torch executor's kernel choices in effect ("" = plain or not torch)

    @staticmethod
    def _median(v: list[float]) -> float:
        s = sorted(v)
        return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])

    def summary(self) -> dict[str, Any]:
        e2e, den = self._median(self.end_to_end_ms), self._median(self.denoise_ms)
        return {"device": self.device, "executor": self.executor, "kernels": self.kernels or "plain",
                "cuda_graph": self.cuda_graph,
                "steps": self.steps, "warmup": self.warmup, "repeats": self.repeats,
                "end_to_end_ms": round(e2e, 2), "denoise_ms": round(den, 2),
                "per_step_ms": round(den / self.steps, 3), "end_to_end_min_ms": round(min(self.end_to_end_ms), 2),
                "denoise_min_ms": round(min(self.denoise_ms), 2)}


def bench(cfg: RunConfig, warmup: int = 2, repeats: int = 5) -> BenchResult:
    """`trtkit bench`: warm-up runs (compilation, capture), then `repeats` timed text -> image runs.
    Per-step latency is the denoising loop's time over the steps; end to end adds text encoding and
    the VAE decode."""
    if warmup < 0 or repeats < 1:
        raise TrtkitError("--warmup must be >= 0 and --repeats >= 1")
    pipe = _open(cfg)
    for _ in range(warmup):
        pipe(cfg)
    runs = [pipe(cfg).timings_ms for _ in range(repeats)]
    return BenchResult(steps=cfg.steps, warmup=warmup, repeats=repeats, executor=pipe.executor.name,
                       cuda_graph=pipe.runner.use_graph, device=pipe.device,
                       end_to_end_ms=[r["total"] for r in runs], denoise_ms=[r["denoise"] for r in runs],
                       kernels=describe_options(getattr(pipe.executor, "options", {})))
