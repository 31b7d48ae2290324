"""One real-browser test: headless Chromium (Debian's package) driven by Playwright against the launched app."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import free_port, write_pairs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (the README's test command "
                                                         "installs it)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]



def test_upload_train_watch_stop_in_a_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from lowrank_pref.ui import CSS, build_app

    demo = build_app(tmp_path / "runs")
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, css=CSS, quiet=True)
    data = write_pairs(tmp_path / "my_pairs.jsonl", n=48)
    shots = Path(os.environ.get("LOWRANK_PREF_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS,
                                         env={**os.environ, "HOME": str(tmp_path)})
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.get_by_text("Fine-tune an open model on one GPU")).to_be_visible(timeout=60_000)

            # Setup: more steps than the run will get to, so it can be stopped
            steps = page.get_by_label("Max steps (0: use epochs)")
            steps.fill("3000")
            steps.press("Tab")

            # Data: upload a file and read the doctor's report
            page.get_by_role("tab", name="2 · Data").click()
            page.locator("input[type=file]").first.set_input_files(str(data))
            expect(page.get_by_text("my_pairs.jsonl").first).to_be_visible(timeout=30_000)
            page.get_by_role("button", name="Check the data").click()
            expect(page.get_by_text(re.compile(r"usable pairs:\s*48"))).to_be_visible(timeout=60_000)
            expect(page.locator(".lp-loss").first).to_be_visible()

            # Train: start, see the progress and the plots move
            page.get_by_role("tab", name="3 · Train").click()
            page.get_by_role("button", name="Start training").click()
            expect(page.get_by_text(re.compile(r"Started \w"))).to_be_visible(timeout=30_000)
            status = page.locator(".lp-status")
            expect(status).to_contain_text(re.compile(r"running · step [1-9]"), timeout=120_000)
            first = int(re.search(r"step (\d+)", status.inner_text()).group(1))
            expect(status).not_to_contain_text(f"step {first} /", timeout=60_000)  # the progress moves
            loss_plot = page.locator(".vega-embed:visible").first
            expect(loss_plot).to_contain_text("train", timeout=30_000)  # a curve is drawn, with its legend
            width = page.locator(".lp-bar").evaluate("e => e.style.width")
            assert float(width.rstrip("%")) > 0
            page.screenshot(path=str(shots / "app-training.png"), full_page=True)

            # Stop: the run writes a checkpoint and says so
            page.get_by_role("button", name="Stop (writes a checkpoint)").click()
            expect(page.locator(".lp-state")).to_have_text("stopped", timeout=120_000)
            page.screenshot(path=str(shots / "app-stopped.png"), full_page=True)
            browser.close()
    finally:
        manager = demo.manager
        if manager.active():
            manager.stop()
            manager.wait(manager.active() or "", timeout=60)
        demo.close()
    run = next(p for p in (tmp_path / "runs").iterdir() if p.name.startswith("dpo-"))
    assert list(run.glob("checkpoint-*")), "a stopped run keeps a checkpoint to resume from"
    assert (shots / "app-training.png").stat().st_size > 10_000
