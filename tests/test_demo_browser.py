"""`python -m paligemma.demo` driven in a real headless browser (Debian's chromium and
chromedriver, through selenium): the README's shapes workdir (conftest.py, trained once)
side by side with a 1-step "base", a freshly drawn shapes image uploaded, Run pressed,
and the fine-tune's caption read off the page. A screenshot is saved as a test artefact
(in $PALIGEMMA_ARTIFACTS, default test-artifacts/ in the repo; docs/demo.png is one).

Chromium missing fails the test, never skips it: .ci/run installs it (apt-get install
chromium chromium-driver)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image

from conftest import REPO  # pylint: disable=g-bad-import-order
from paligemma.data import shapes

ARTIFACTS = os.environ.get("PALIGEMMA_ARTIFACTS", os.path.join(REPO, "test-artifacts"))
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def _executable(names, what):
  for name in names:
    path = shutil.which(name)
    if path:
      return path
  raise AssertionError(f"{what} not found ({', '.join(names)}): install it with "
                       "`apt-get install -y chromium chromium-driver` (.ci/run does).")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
              GRADIO_ANALYTICS_ENABLED="False")


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  """A shapes model trained for one step: the "base" the fine-tune is compared with."""
  workdir = str(tmp_path_factory.mktemp("shapes_base"))
  out = subprocess.run([sys.executable, "-m", "paligemma.train",
                        "--config=transfers/shapes.py:steps=1,evals=False",
                        f"--workdir={workdir}", "--config.progress=False"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def demo_url(shapes_workdir, base_workdir, tmp_path_factory):
  """The demo served on a free local port; its log is shown if it fails to start."""
  port = _free_port()
  log_path = tmp_path_factory.mktemp("demo_log") / "demo.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [sys.executable, "-m", "paligemma.demo", "--checkpoint", base_workdir,
         "--compare", shapes_workdir, "--names", "base (1 step)", "fine-tune",
         "--port", str(port)],
        cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}/"
  try:
    deadline = time.time() + 300
    while True:
      assert proc.poll() is None, f"the demo exited:\n{log_path.read_text()[-3000:]}"
      assert time.time() < deadline, f"the demo did not serve:\n{log_path.read_text()[-3000:]}"
      try:
        with urllib.request.urlopen(url, timeout=5) as r:
          if r.status == 200:
            break
      except OSError:
        time.sleep(1)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()


@pytest.fixture
def browser():
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = _executable(CHROMIUM, "Chromium")
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,1000"):
    options.add_argument(arg)
  # Debian's driver, so that selenium never tries to download one.
  service = Service(_executable(("chromedriver",), "chromedriver"))
  driver = webdriver.Chrome(service=service, options=options)
  try:
    yield driver
  finally:
    driver.quit()


def _textarea_value(driver, elem_id):
  return driver.find_element("css selector", f"#{elem_id} textarea").get_attribute("value")


def test_browser_uploads_a_shapes_image_and_reads_the_caption(demo_url, browser, tmp_path):
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  source = shapes.make(task="caption", num_examples=1, seed=777, image_size=32)
  image = tmp_path / "fresh.png"
  Image.fromarray(source[0]["image"]).resize((256, 256), Image.NEAREST).save(image)
  wait = WebDriverWait(browser, 240, poll_frequency=0.5)
  browser.get(demo_url)
  upload = wait.until(lambda d: d.find_elements("css selector", "#image input[type=file]"))
  upload[0].send_keys(str(image))
  # The upload is done when the component shows the image.
  wait.until(lambda d: d.find_elements("css selector", "#image img"))
  browser.find_element("css selector", "#run").click()
  wait.until(lambda d: _textarea_value(d, "output-1") and _textarea_value(d, "output-0"))
  assert _textarea_value(browser, "prompt") == "caption en"
  caption = _textarea_value(browser, "output-1")
  os.makedirs(ARTIFACTS, exist_ok=True)
  wait.until(lambda d: d.find_elements("css selector", "#drawn-1 img"))
  browser.execute_script("window.scrollTo(0, 0)")
  browser.save_screenshot(os.path.join(ARTIFACTS, "demo_browser.png"))
  print(f"demo: fine-tune {caption!r}, base {_textarea_value(browser, 'output-0')!r}; "
        f"screenshot in {ARTIFACTS}")
  assert caption == source[0]["suffix"]
