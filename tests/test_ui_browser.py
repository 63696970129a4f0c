"""The page in a real browser (Debian's chromium driven by Playwright), as a person would use it at laptop width:
train a LoRA on datasets/pastel, watch the progress reach the end, add it to the mix, move a slider, generate.

Screenshots go to $SDLORA_UI_SCREENSHOTS (docs/ui when refreshing the README's) or a temporary folder.
"""

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)",
                allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the ui extra (fastapi, uvicorn) is not installed")

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from tests.ui_helpers import ui_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LORA = "runs/pastel/pastel.safetensors"


@pytest.mark.slow
def test_train_watch_mix_and_generate_in_a_browser(tmp_path):
    shots = Path(os.environ.get("SDLORA_UI_SCREENSHOTS") or tmp_path / "screens")
    shots.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "root"
    shutil.copytree(REPO / "datasets" / "pastel", root / "datasets" / "pastel")
    errors: list[str] = []
    with ui_server(root) as c, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(c.url)
        expect(page.locator("#train-folder option[value='datasets/pastel']")).to_have_count(1)

        # ── train for a few steps and watch the progress reach the end
        page.select_option("#train-folder", "datasets/pastel")
        page.fill("#train-name", "pastel")
        page.fill("#train-trigger", "sks pastel")
        page.fill("#train-steps", "12")
        page.fill("#train-sample-prompt", "sks pastel, a large red circle in the center of a white background")
        page.fill("#train-sample-every", "6")
        page.click("#train-start")
        expect(page.locator("#train-status")).to_have_attribute("data-status", "running")
        second = browser.new_page(viewport={"width": 1366, "height": 768})  # a second tab re-attaches to the job
        second.goto(c.url)
        expect(second.locator("#train-job")).to_contain_text("pastel · job1")
        second.close()
        expect(page.locator("#train-status")).to_have_attribute("data-status", "done", timeout=600_000)
        expect(page.locator("#train-bar")).to_have_attribute("data-pct", "100")
        expect(page.locator("#train-status")).to_contain_text("step 12 / 12")
        expect(page.locator("#samples figure")).to_have_count(2)  # step 6 and the end
        page.screenshot(path=str(shots / "train.png"))

        # ── add it to the mix and generate
        page.click("#tab-mix")
        page.locator(f".lib[data-path='{LORA}'] button.add").click()
        entry = page.locator(f".entry[data-path='{LORA}']")
        expect(entry).to_have_count(1)
        expect(page.locator("#prompt")).to_have_value("sks pastel, a red circle in the center of a white background")
        page.fill("#steps", "8")  # 8 sampling steps keep each image quick on a CPU
        page.click("#generate")
        info = page.locator("#result-info")
        expect(info).to_contain_text("pastel: UNet 1.00", timeout=300_000)
        first = page.get_attribute("#result", "src")

        # ── move the UNet slider: it re-generates with the new strength, in place
        slider = entry.locator("input[aria-label='UNet']")
        slider.focus()
        page.keyboard.press("ArrowLeft")  # one notch, as a person nudges it: 0.95
        expect(info).to_contain_text("pastel: UNet 0.95", timeout=300_000)
        slider.fill("0.7")  # then a drag to 0.70: one input and one change event
        shown = entry.locator(".slider output").first
        expect(shown).to_have_text("0.70")
        expect(entry.locator(".slider output").nth(1)).to_have_text("0.70")  # TE follows UNet until moved itself
        expect(info).to_contain_text("pastel: UNet 0.70", timeout=300_000)
        expect(info).to_contain_text("strengths changed in place")
        applied = page.evaluate("JSON.parse(document.querySelector('#result-info').dataset.applied)")
        assert abs(applied[0]["strength"] - float(shown.inner_text())) < 1e-6
        assert page.get_attribute("#result", "src") != first  # the image changed

        # ── per-block weights: only the output blocks
        entry.locator("summary").click()
        entry.locator("select[aria-label='block weights']").select_option("OUTALL")
        expect(info).to_contain_text("lbw OUTALL", timeout=300_000)
        page.screenshot(path=str(shots / "mix.png"))

        # ── files: inspect what was trained
        page.click("#tab-files")
        page.select_option("#file-pick", LORA)
        page.click("#file-inspect")
        expect(page.locator("#file-report")).to_contain_text("trigger:      sks pastel")
        expect(page.locator("#meta-trigger")).to_have_value("sks pastel")
        page.screenshot(path=str(shots / "files.png"))
        browser.close()
    assert not errors, errors
