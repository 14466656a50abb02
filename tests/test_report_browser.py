"""The HTML reports in a real browser: headless Chromium renders them, every plot loads and is
not blank, and the page carries the expected headings. A screenshot of each page is kept in
the test's tmp folder."""

import io
import shutil

import pytest
import yaml

from tunesmith.cli import main

from test_cli import write_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

# for each <img>: alt, loaded, width, height, and the share of pixels that are not near-white
IMAGES_JS = """
return Array.from(document.images).map(img => {
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let ink = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] < 235 || d[i + 1] < 235 || d[i + 2] < 235) ink++;
  return [img.alt, img.complete, img.naturalWidth, img.naturalHeight, ink / (d.length / 4)];
});
"""


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.fail("headless Chromium is needed: `make setup` installs the Debian packages chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,2600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def check_page(browser, path, headings, n_images, shot):
    browser.get(path.as_uri())
    found = browser.execute_script("return Array.from(document.querySelectorAll('h1, h2')).map(h => h.textContent)")
    for h in headings:
        assert any(h in f for f in found), (h, found)
    images = browser.execute_script(IMAGES_JS)
    assert len(images) == n_images, images
    for alt, complete, width, height, ink in images:
        assert complete and width > 300 and height > 150, alt
        assert ink > 0.01, f"{alt}: the plot is blank ({ink:.2%} of pixels drawn)"
    png = browser.get_screenshot_as_png()
    shot.write_bytes(png)
    from PIL import Image

    page = Image.open(io.BytesIO(png)).convert("L")
    assert page.size[0] > 500 and len(page.getcolors(256)) > 20  # a rendered page, not an empty canvas


def test_reports_render_in_chromium(browser, tmp_path, tiny_model_dir, sst_files):
    path = write_config(tmp_path, tiny_model_dir, sst_files)
    cfg = yaml.safe_load(path.read_text())
    cfg["prompt"] = {"shots": 1}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["compare", str(path), "--methods", "prompt,lora", "--set", "eval.bootstrap_resamples=200",
                 "--data-sizes", "4"]) == 0
    runs = tmp_path / "runs"
    check_page(browser, runs / "tiny-compare" / "compare.html",
               ["methods compared", "Loss curves", "Test accuracy", "Cost and quality", "Data needs"], 4,
               tmp_path / "compare.png")
    check_page(browser, runs / "tiny-lora" / "report.html",
               ["tunesmith run", "Base vs tuned", "Inference speed", "Per class", "Training", "Data"], 3,
               tmp_path / "report.png")
