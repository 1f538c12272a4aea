"""The shapes benchmark (benchmarks/shapes): renderer, labels, sampling API, judge, and train.py --small
end to end on the CPU (the H200 run is the same code with the full sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.shapes import model as M  # noqa: E402
from benchmarks.shapes import render as R  # noqa: E402
from benchmarks.shapes.judge import accuracy, frechet_distance, load_judge  # noqa: E402


def test_render_is_deterministic_and_draws_the_scene() -> None:
    a = R.sample_scenes(300, np.random.default_rng(7))
    b = R.sample_scenes(300, np.random.default_rng(7))
    assert a == b
    img = R.render(a)
    assert img.shape == (300, 32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img, R.render(b))
    assert np.array_equal(img[:10], R.render(a[:10]))  # an image does not depend on its batch
    for s, im in zip(a, img, strict=True):
        for c, x, y in ((s.colour1, s.x1, s.y1), (s.colour2, s.x2, s.y2)):
            # every shape covers its centre pixel, in its own colour
            px = im[int(y), int(x)].astype(np.float32) / 255
            assert np.abs(px - R.RGB[c]).max() < 0.02, (R.caption(s), px)


def test_labels_are_canonical() -> None:
    s = R.Scene(colour1=0, shape1=1, relation=R.RELATIONS.index("below"), colour2=2, shape2=3)
    lab = R.labels([s])
    # "a red square below a blue diamond": the top object (a) is the blue diamond
    assert (lab["colour_a"][0], lab["shape_a"][0], lab["colour_b"][0], lab["shape_b"][0]) == (2, 3, 0, 1)
    assert lab["axis"][0] == 0
    scenes = R.sample_scenes(500, np.random.default_rng(1))
    lab = R.labels(scenes)
    for i, sc in enumerate(scenes):
        first_x, first_y = (sc.x1, sc.y1) if sc.relation in (0, 2) else (sc.x2, sc.y2)
        other_x, other_y = (sc.x2, sc.y2) if sc.relation in (0, 2) else (sc.x1, sc.y1)
        if lab["axis"][i] == 0:
            assert other_y - first_y >= 12 and abs(other_x - first_x) <= 5
        else:
            assert other_x - first_x >= 12 and abs(other_y - first_y) <= 5


def test_captions_tokenize() -> None:
    scenes = R.sample_scenes(200, np.random.default_rng(2))
    ids = M.tokenize([R.caption(s) for s in scenes] + [""])
    assert ids.shape == (201, M.MAX_TOKENS)
    assert R.caption(R.Scene(0, 0, 3, 1, 1)) == "a red circle to the right of a green square"
    with pytest.raises(KeyError):
        M.tokenize(["a pink circle"])


def test_frechet_distance_matches_scipy() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.5
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # type: ignore[type-arg]
    from benchmarks.shapes import train

    out = tmp_path_factory.mktemp("shapes") / "weights"
    summary = train.main(["--small", "--device", "cpu", "--out", str(out)])
    return out, summary


@pytest.mark.slow  # ~20 s on an idle 2-core CPU, minutes on a busy one
def test_train_small_end_to_end(small_run: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    out, summary = small_run
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "judge.safetensors", "samples.png", "summary.json", "text_encoder.safetensors",
                     "unet.safetensors"]
    assert json.loads((out / "summary.json").read_text())["eval"] == summary["eval"]
    # 40 judge steps: far from the full run's > 99 %, but above chance where it is easiest
    clean = summary["judge_clean"]
    assert clean["axis"] > 0.7
    assert (clean["colour_a"] + clean["colour_b"]) / 2 > 2 / len(R.COLOURS)
    acc = summary["eval"]["2.0"]["accuracy"]
    assert set(acc) == set(R.ATTRIBUTES) | {"scene"}


@pytest.mark.slow
def test_saved_pipeline_samples_per_seed(small_run: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    out, _ = small_run
    pipe, judge = M.load_pipeline(out), load_judge(out)
    caps = ["a red circle above a blue square", "a green cross to the left of a cyan diamond"]
    both = pipe(caps, [3, 4], steps=2, guidance=2.0)
    one = M.sample(pipe.unet, pipe.text_encoder, caps[1:], [4], 2, 2.0)
    assert both.shape == (2, 32, 32, 3) and both.dtype == np.uint8
    # the image of a seed does not depend on its batch (batched conv/GEMM may differ in the last bit)
    assert np.abs(both[1:].astype(int) - one.astype(int)).max() <= 1
    scenes = R.sample_scenes(4, np.random.default_rng(3))
    acc = accuracy(judge, R.render(scenes), scenes)
    assert set(acc) == set(R.ATTRIBUTES) | {"scene"}
    assert judge.features(both).shape == (2, 256)
