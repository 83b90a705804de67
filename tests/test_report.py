"""The HTML report, in a real browser: headless Chromium driven by Selenium opens the page with no console
error and no network request, every control changes the heatmap, and the canvas holds the bytes that
``attnmap.render.frames`` makes for the same map and options."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import matplotlib
import numpy as np
import pytest
from PIL import Image

from attnmap import render
from attnmap.errors import AttnmapError
from attnmap.render import report
from attnmap.render.options import RenderOptions
from attnmap.store import StoreWriter, open_store
from conftest import page_data

GRID = (3, 4, 6)
SIZE = (30, 46)  # an odd-free, non-multiple size: every tap of the bilinear resize is a fraction


# -- stores written here ------------------------------------------------------------------------------
def write_original(path: Path, frames: int = 9, size: tuple[int, int] = SIZE) -> Path:
    rng = np.random.default_rng(5)
    video = rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    return render.write_video(video, path, fps=8)


def write_store(
    root: Path,
    video_id: str = "vid 1",
    *,
    original: Optional[Path] = None,
    steps: int = 2,
    heads: int = 2,
    blocks: int = 2,
    uncond: bool = True,
    extra: Optional[dict[str, np.ndarray]] = None,
    text_tokens: Optional[list[str]] = None,
    seed: int = 0,
) -> Path:
    """Tokens cat and dog: per head [H, F, h, w] for each block and their mean; a per-head temporal matrix
    per block; a text map of 8 tokens of which ``text_tokens`` are real; an unconditional branch."""
    rng = np.random.default_rng(seed)
    video = {"height": SIZE[0], "width": SIZE[1], "fps": 8, "frames": 9}
    if original is not None:
        video["path"] = str(original)
    meta = {
        "targets": {"cat": [1], "dog": [3]},
        "text_tokens": text_tokens or ["a", "cat", "and", "dog", "run"],
        "grid": list(GRID),
        "vae_stride": [4, 8, 8],
        "video": video,
        "model": "test",
        "prompt": "a cat and dog run",
    }
    with StoreWriter(root, video_id, meta, dtype="float32") as writer:
        for step in range(steps):
            maps: dict[str, np.ndarray] = {}
            for prefix in ("", "uncond/") if uncond else ("",):
                for word in ("cat", "dog"):
                    per_block = [rng.random((heads, *GRID), dtype=np.float32) for _ in range(blocks)]
                    per_block[0][..., 0, 0] += 3.0 * (step + 1)  # a hot corner that moves with the step
                    for b, arr in enumerate(per_block):
                        maps[f"{prefix}token/{word}/block{b}"] = arr
                    maps[f"{prefix}token/{word}"] = np.mean(per_block, axis=0)
            temporal = [rng.random((heads, 3, 3), dtype=np.float32) for _ in range(blocks)]
            for b, arr in enumerate(temporal):
                maps[f"temporal/block{b}"] = arr
            maps["temporal"] = np.mean(temporal, axis=0)
            maps["text"] = rng.random((8, 8), dtype=np.float32)
            maps.update(extra or {})
            writer.write_step(step, maps)
    return root


# -- the browser ----------------------------------------------------------------------------------------
def _chrome() -> tuple[Optional[str], Optional[str]]:
    binary = next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
    )
    return binary, shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extras)")
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chrome()
    if binary is None or driver_path is None:
        pytest.skip("Chromium or chromedriver is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1300,1800",
    ):
        options.add_argument(arg)
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as exc:  # a browser that cannot start here: say why
        pytest.skip(f"Chromium could not start: {str(exc).splitlines()[0]}")
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: Any, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    wait(driver)
    driver.get_log("browser")  # nothing before here is asked for; the tests read the log after load


def wait(driver: Any, root: int = 0) -> None:
    deadline = time.monotonic() + 20
    script = (
        "const r = document.querySelectorAll('.attnmap-report')[arguments[0]]; return r && r.dataset.busy;"
    )
    while driver.execute_script(script, root) != "0":
        assert time.monotonic() < deadline, "the page never finished drawing"
        time.sleep(0.02)


def canvas(driver: Any, root: int = 0, role: str = "heatmap") -> np.ndarray:
    wait(driver, root)
    url = driver.execute_script(
        f"return document.querySelectorAll('.attnmap-report')[arguments[0]].querySelector('[data-role={role}]')"
        ".toDataURL('image/png')",
        root,
    )
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB"))


def set_control(driver: Any, role: str, value: Any, root: int = 0) -> None:
    driver.execute_script(
        "const c = document.querySelectorAll('.attnmap-report')[arguments[0]].querySelector("
        "'[data-role=' + arguments[1] + ']'); c.value = arguments[2];"
        "c.dispatchEvent(new Event(c.tagName === 'SELECT' ? 'change' : 'input'));",
        root,
        role,
        str(value),
    )
    wait(driver, root)


def backgrounds(video: dict[str, Any]) -> np.ndarray:
    """The page's overlay frames decoded with Pillow."""
    frames = []
    for b64 in video["background"]:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
            frames.append(np.asarray(image.convert("RGB")))
    return np.stack(frames)


def levels(pixels: np.ndarray, colormap: str) -> np.ndarray:
    """The colormap level of each RGB pixel (the nearest of matplotlib's 256 colours)."""
    table = (np.asarray(matplotlib.colormaps[colormap](np.arange(256) / 255.0))[:, :3] * 255).round()
    distance = ((pixels.reshape(-1, 1, 3).astype(float) - table[None]) ** 2).sum(-1)
    return distance.argmin(-1).reshape(pixels.shape[:2])


# -- tests --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    original = write_original(tmp / "original.mp4")
    root = write_store(tmp / "store", original=original)
    write_store(root, "vid 2", steps=1, heads=1, blocks=1, uncond=False, seed=1)  # no original: colours alone
    return report.write_report(root, tmp / "report.html")


def test_page_is_self_contained_and_opens_cleanly(
    browser: Any, page: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = page.read_text(encoding="utf-8")
    assert "<script src" not in text and "stylesheet" not in text
    assert not re.search(r"(src|href)=\"(https?:|//)", text)
    browser.get_log("performance")
    browser.get(page.resolve().as_uri())
    wait(browser)
    set_control(browser, "frame", 4)
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == []
    events = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert urls == [page.resolve().as_uri()]  # the page itself, nothing else
    roles = browser.execute_script(
        "return Array.from(document.querySelectorAll('[data-role]')).map(e => e.dataset.role)"
    )
    for role in (
        "video",
        "token",
        "step",
        "block",
        "head",
        "branch",
        "frame",
        "alpha",
        "colormap",
        "normalize",
        "heatmap",
        "play",
    ):
        assert role in roles, role
    shots = Path(os.environ.get("ATTNMAP_TEST_ARTIFACTS", page.parent))
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "report_screenshot.png"
    assert browser.save_screenshot(str(shot))
    with capsys.disabled():
        print(f"\nreport screenshot: {shot}")
    with Image.open(shot) as image:
        assert image.size[0] > 600 and np.asarray(image.convert("RGB")).std() > 10


CASES = [
    ({}, "hot"),
    ({"frame": 5}, "hot"),
    ({"step": 1, "frame": 2}, "hot"),
    ({"head": 1, "frame": 8}, "hot"),
    ({"block": 1}, "hot"),
    ({"branch": "uncond", "frame": 3}, "hot"),
    ({"token": "dog", "normalize": "frame", "frame": 7}, "viridis"),
    ({"normalize": "percentile", "frame": 1}, "jet"),
    ({"normalize": "max", "alpha": 0.25}, "inferno"),
    ({"normalize": "sum", "alpha": 1.0, "frame": 6}, "gray"),
    ({"normalize": "none", "alpha": 0.0}, "turbo"),
]


@pytest.mark.parametrize(("changes", "colormap"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_canvas_equals_render_frames(
    browser: Any, page: Path, changes: dict[str, Any], colormap: str
) -> None:
    """With a background: the page's bytes equal render.frames of the map the page carries, over the page's
    frames decoded by Pillow; against the stored float map, within a colour level."""
    open_page(browser, page)
    state = {"token": "cat", "step": "mean", "block": "all", "head": "mean", "branch": "cond", "frame": 0,
             "alpha": 0.6, "normalize": "global", **changes}  # fmt: skip
    for role in ("token", "branch", "step", "block", "head", "normalize", "alpha", "frame"):
        set_control(browser, role, state[role])
    set_control(browser, "colormap", colormap)
    got = canvas(browser)
    video = page_data(page)["videos"][0]
    key = "|".join(str(state[k]) for k in ("token", "step", "block", "head", "branch"))
    carried = report.dequantize(video["maps"][key])
    common = {
        "size": SIZE,
        "temporal_stride": 4,  # the original has the 9 frames of 3 latent frames by the VAE stride
        "num_frames": None,
        "colormap": colormap,
        "normalize": state["normalize"],
        "background": backgrounds(video),
        "alpha": float(state["alpha"]),
    }
    want = render.frames(carried, **common)[state["frame"]]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    store = open_store(page.parent / "store")
    name = store.map_name(
        "vid 1",
        state["token"],
        block=None if state["block"] == "all" else state["block"],
        branch=state["branch"],
    )
    stored = (
        store.load("vid 1", name) if state["step"] == "mean" else store.load("vid 1", name, state["step"])
    )
    stored = stored.mean(0) if state["head"] == "mean" else stored[state["head"]]
    exact = render.frames(stored, **common)[state["frame"]]
    table = render.colormap_table(colormap).astype(int)
    step = np.abs(np.diff(table, axis=0)).max()  # the largest change of one colour level
    assert np.abs(got.astype(int) - exact.astype(int)).max() <= np.ceil(2 * step * float(state["alpha"])) + 1


@pytest.mark.parametrize("colormap", ["viridis", "magma", "gray"])
@pytest.mark.parametrize("normalize", ["global", "frame", "percentile", "max"])
def test_colours_alone_within_two_levels_of_the_stored_map(
    browser: Any, page: Path, colormap: str, normalize: str
) -> None:
    """The second video has no original: the canvas is the colormap alone, its levels within 2 (measured:
    at most 1) of render.frames of the stored float32 map, and equal to it for the carried map."""
    open_page(browser, page)
    set_control(browser, "video", 1)
    set_control(browser, "colormap", colormap)
    set_control(browser, "normalize", normalize)
    set_control(browser, "frame", 3)
    got = canvas(browser)
    video = page_data(page)["videos"][1]
    assert video["background"] is None
    common = {"size": SIZE, "temporal_stride": 4, "colormap": colormap, "normalize": normalize}
    carried = report.dequantize(video["maps"]["cat|mean|all|mean|cond"])
    np.testing.assert_array_equal(got, render.frames(carried, **common)[3])
    stored = open_store(page.parent / "store").aggregated("vid 2", "cat").map
    want = render.frames(stored, **common)[3]
    assert np.abs(levels(got, colormap) - levels(want, colormap)).max() <= 2


def test_every_control_changes_the_canvas(browser: Any, page: Path) -> None:
    open_page(browser, page)
    changes = [
        ("frame", 4), ("token", "dog"), ("step", 1), ("step", "mean"), ("block", 1), ("block", "all"),
        ("head", 1), ("head", "mean"), ("branch", "uncond"), ("alpha", 0.9), ("colormap", "viridis"),
        ("normalize", "frame"), ("video", 1),
    ]  # fmt: skip
    before = canvas(browser)
    for role, value in changes:
        set_control(browser, role, value)
        after = canvas(browser)
        assert after.shape != before.shape or not np.array_equal(after, before), (
            f"{role}={value} changed nothing"
        )
        before = after
    # play moves the frame scrubber on its own; pause stops it
    open_page(browser, page)
    start = canvas(browser)
    browser.execute_script("document.querySelector('[data-role=play]').click()")
    deadline = time.monotonic() + 10
    while browser.execute_script("return document.querySelector('[data-role=frame]').value") == "0":
        assert time.monotonic() < deadline, "play never advanced the frame"
        time.sleep(0.05)
    browser.execute_script("document.querySelector('[data-role=play]').click()")
    assert not np.array_equal(canvas(browser), start)
    assert browser.execute_script("return document.querySelector('[data-role=play]').textContent") == "play"


def test_a_combination_the_page_lacks_falls_back_to_a_mean(browser: Any, tmp_path: Path) -> None:
    root = write_store(tmp_path / "s", uncond=False)
    path = report.write_report(root, tmp_path / "r.html", max_map_bytes=2 * 2 * 3 * 4 * 6 * 3)
    data = page_data(path)["videos"][0]
    assert "cat|1|1|mean|cond" not in data["maps"] and "cat|mean|1|mean|cond" in data["maps"]
    assert any("per-step per-block maps left out" in n for n in data["notes"])
    open_page(browser, path)
    set_control(browser, "step", 1)
    set_control(browser, "block", 1)  # step 1 x block 1 is not carried: step goes back to the mean
    state = browser.execute_script("const v = attnmapReport.viewers.at(-1).state; return [v.step, v.block]")
    assert state == ["mean", 1]
    assert "showing the mean over steps" in browser.find_element("css selector", "[data-role=notice]").text


def test_panels_show_the_stored_values(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    rng = np.random.default_rng(3)
    stats = {
        "blocks": rng.random((4, 5), dtype=np.float32),
        "distance": rng.random((2, 3, 3, 4), dtype=np.float32),  # per head [H, F, H, W]
        "entropy": rng.random(72, dtype=np.float32),  # one per video query: shown as a map
        "received/text": rng.random(7, dtype=np.float32),
        "blocks/block1": rng.random((4, 5), dtype=np.float32),
    }
    root = write_store(tmp_path / "s", extra=stats, steps=1, uncond=False)
    path = report.write_report(root, tmp_path / "r.html")
    open_page(browser, path)
    titles = [e.text for e in browser.find_elements("css selector", "[data-role=stat] h3")]
    assert sorted(titles) == ["blocks", "blocks/block1", "distance", "entropy", "received/text"]
    store = open_store(root)
    # the frame-to-frame matrix: the value under the mouse is the stored one (block mean, head mean)
    temporal = store.load("vid 1", "temporal").mean(0)
    matrix = browser.find_element("css selector", "[data-role=temporal-matrix]")
    width, height = matrix.size["width"], matrix.size["height"]
    for i, j in ((0, 2), (2, 1)):
        x, y = (j + 0.5) * width / 3 - width / 2, (i + 0.5) * height / 3 - height / 2
        ActionChains(browser).move_to_element_with_offset(matrix, round(x), round(y)).perform()
        readout = browser.find_element("css selector", "[data-role=temporal-matrix-value]").text
        assert readout.startswith(f"query frame {i} \u2192 key frame {j}: ")
        assert float(readout.rsplit(": ", 1)[1]) == pytest.approx(float(temporal[i, j]), rel=5e-3)
    # the text panel shows the 5 real tokens of the 8 stored
    text = browser.find_element("css selector", "[data-role=text]").text
    assert "5 real tokens of 8" in text and "4: run" in text
    # locality: the mass in the own frame per block and head, from a float64 reference
    cells = [e.text for e in browser.find_elements("css selector", "[data-role=locality] td")]
    want = []
    for b in range(2):
        t = store.load("vid 1", f"temporal/block{b}").astype(np.float64)
        loc = (np.diagonal(t, axis1=-2, axis2=-1) / t.sum(-1)).mean(-1)
        cut = 1 / 3 + 0.5 * (1 - 1 / 3)
        want += [f"{v:.2f} {'S' if v > cut else 'T'}" for v in loc]
    assert cells == want

    # the per-head statistic follows the head control
    def distance_panel() -> str:
        panels = browser.find_elements("css selector", "[data-role=stat]")
        return next(p.text for p in panels if p.find_element("css selector", "h3").text == "distance")

    assert "head: mean" in distance_panel()
    assert f"mean {stats['distance'].mean():.3g}" in distance_panel()
    set_control(browser, "head", 1)
    assert "head: 1" in distance_panel()
    assert f"mean {stats['distance'][1].mean():.3g}" in distance_panel()


def test_notebook_viewers_are_the_same_viewer_inline(browser: Any, page: Path, tmp_path: Path) -> None:
    import attnmap

    store = open_store(page.parent / "store")
    one, two = attnmap.show(store, "vid 1"), attnmap.show(page.parent / "store", "vid 2")
    assert one.video_ids == ["vid 1"] and attnmap.show(store).video_ids == ["vid 1", "vid 2"]
    with pytest.raises(
        attnmap.AttnmapError, match="source must be a Store, a store root or a Recorder, got int"
    ):
        attnmap.show(3)
    html = one._repr_html_()
    assert html.startswith('<div class="attnmap-report"') and "<html" not in html
    notebook = tmp_path / "notebook.html"  # two outputs in one page, as a notebook shows them
    notebook.write_text(
        f"<!DOCTYPE html><html><body><p>cell 1</p>{html}<p>cell 2</p>{two._repr_html_()}</body></html>"
    )
    open_page(browser, notebook)
    wait(browser, 1)
    set_control(browser, "frame", 5, root=0)
    inline = canvas(browser, 0)
    open_page(browser, page)
    set_control(browser, "frame", 5)
    np.testing.assert_array_equal(inline, canvas(browser))
    assert canvas(browser, 0).shape == canvas(browser, 0).shape
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_recorder_viewer_shows_the_recorded_maps(browser: Any, tmp_path: Path) -> None:
    import torch

    import attnmap
    from tiny_models import wan

    model, kwargs = wan()
    with attnmap.capture(model, reductions=("cross", "temporal"), targets={"cat": [1], "dog": [4, 5]},
                         per_head=True, per_block=True) as rec:  # fmt: skip
        for _ in range(2):
            with torch.no_grad():
                model(**kwargs)
            rec.step()
    viewer = report.recorder_viewer(rec, video_id="tiny wan")
    shown = rec.show()  # the notebook entry point: the same viewer, titled by the model
    assert shown.payload["videos"][0]["maps"] == viewer.payload["videos"][0]["maps"]
    assert attnmap.show(rec).payload["videos"][0]["maps"] == viewer.payload["videos"][0]["maps"]
    assert "attnmapReport.mount(" in shown._repr_html_()
    video = viewer.payload["videos"][0]
    assert video["steps"] == [0, 1] and video["blocks"] == [0, 1] and video["heads"] == 2
    want = rec.get("token/cat", step=1, block=0)[0].mean(0).numpy()
    got = report.dequantize(video["maps"]["cat|1|0|mean|cond"])
    assert np.abs(got - want).max() <= (want.max() - want.min()) / 510 + 1e-7
    path = viewer.save(tmp_path / "rec.html")
    open_page(browser, path)
    set_control(browser, "step", 1)
    set_control(browser, "block", 0)
    got_canvas = canvas(browser)
    np.testing.assert_array_equal(
        got_canvas, render.frames(got, size=tuple(video["size"]), num_frames=video["frames"])[0]
    )


def test_quantize_round_trip_and_nan() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((3, 4, 5)) * 7 - 2).astype(np.float32)
    x[1, 2, 3] = np.nan
    entry = report.quantize(x)
    back = report.dequantize(entry)
    finite = np.isfinite(x)
    assert np.isnan(back[1, 2, 3]) and entry["bad"] == [1 * 20 + 2 * 5 + 3]
    span = np.nanmax(x) - np.nanmin(x)
    assert np.abs(back[finite] - x[finite]).max() <= span / 510 * (1 + 1e-5)
    assert report.dequantize(report.quantize(np.full((2, 2), 3.0)))[0, 0] == 3.0


def test_bad_requests_name_the_problem(tmp_path: Path) -> None:
    root = write_store(tmp_path / "s", steps=1)
    with pytest.raises(AttnmapError, match="video 'nope' is not in the store"):
        report.write_report(root, tmp_path / "r.html", video_ids=["nope"])
    with pytest.raises(AttnmapError, match=r"output: expected a file ending in \.html"):
        report.write_report(root, tmp_path / "r.pdf")
    with StoreWriter(tmp_path / "t", "no tokens", {"grid": [1, 2, 2]}) as writer:
        writer.write_step(0, {"temporal": np.ones((1, 1), np.float32)})
    with pytest.raises(AttnmapError, match="has no token maps to show"):
        report.write_report(tmp_path / "t", tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_page_options_start_the_viewer(tmp_path: Path) -> None:
    root = write_store(tmp_path / "s", steps=1)
    options = RenderOptions(colormap="jet", normalize="fixed", vmin=0.0, vmax=2.0, overlay_alpha=0.3)
    data = report.store_viewer(open_store(root), options=options).payload
    assert data["options"] == {
        "colormap": "jet",
        "normalize": "fixed",
        "alpha": 0.3,
        "vmin": 0.0,
        "vmax": 2.0,
    }
    assert "fixed" in data["normalize"]
    assert set(data["colormaps"]) == set(render.colormap_names())
    table = np.frombuffer(base64.b64decode(data["colormaps"]["jet"]), np.uint8).reshape(256, 3)
    np.testing.assert_array_equal(table, render.colormap_table("jet"))
