// Opens a results page (report.html) in headless Chromium and reports what a person would see, as JSON:
// the viewer's state once the model has loaded, a screenshot of the 3-D view at each requested slider time
// (OUT_DIR/viewer_<i>.png, slider moved like a user would: value set, "input" event), whether each video plays,
// and every console error, page error and failed request.
// Usage: node check_report.mjs PAGE(path or URL) OUT_DIR '[0, 1]' [SELECTOR]
//   times as fractions of the animation; SELECTOR: the element screenshotted (default the 3-D view's canvas)
import { mkdirSync } from "node:fs";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";
import puppeteer from "puppeteer-core";

const [pageArg, outDir, timesArg, selector] = process.argv.slice(2);
if (!pageArg || !outDir) {
  console.error("usage: node check_report.mjs PAGE OUT_DIR '[t0, t1, ...]'");
  process.exit(2);
}
const url = /^[a-z]+:\/\//.test(pageArg) ? pageArg : pathToFileURL(resolve(pageArg)).href;
const times = JSON.parse(timesArg || "[0, 1]");
mkdirSync(outDir, { recursive: true });

const browser = await puppeteer.launch({
  executablePath: process.env.A124_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
         "--disable-background-networking", "--disable-component-update", "--no-first-run",
         "--autoplay-policy=no-user-gesture-required", "--allow-file-access-from-files"],
});
const result = { url, console_errors: [], page_errors: [], failed_requests: [], screenshots: [], videos: [] };
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 1200, height: 900 });
  page.on("console", (msg) => {
    if (msg.type() === "error") result.console_errors.push(msg.text());
  });
  page.on("pageerror", (err) => result.page_errors.push(String(err)));
  page.on("requestfailed", (req) => result.failed_requests.push(`${req.url()}: ${req.failure()?.errorText}`));
  await page.goto(url, { waitUntil: "load", timeout: 120000 });
  await page.waitForFunction(() => window.a124Viewer && (window.a124Viewer.ready || window.a124Viewer.error),
                             { timeout: 180000 });
  result.viewer = await page.evaluate(() => ({ ...window.a124Viewer, setTime: undefined }));
  const canvas = await page.$(selector || "#viewer-canvas");
  for (let i = 0; i < times.length && result.viewer.ready; i++) {
    const shown = await page.evaluate(async (fraction) => {
      const slider = document.getElementById("viewer-time");
      slider.value = String(fraction * window.a124Viewer.duration);
      slider.dispatchEvent(new Event("input", { bubbles: true }));
      await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
      return { time: window.a124Viewer.time, playing: window.a124Viewer.playing,
               label: document.getElementById("viewer-label").textContent };
    }, times[i]);
    const path = `${outDir}/viewer_${i}.png`;
    await canvas.screenshot({ path });
    result.screenshots.push({ fraction: times[i], path, ...shown });
  }
  result.videos = await page.evaluate(async () => {
    const out = [];
    for (const video of document.querySelectorAll("video")) {
      let played = null;
      try {
        await video.play();
        const t0 = performance.now();
        while (video.currentTime <= 0.05 && performance.now() - t0 < 15000 && !video.error) {
          await new Promise((r) => setTimeout(r, 100));
        }
        played = video.currentTime > 0.05;
      } catch (err) {
        played = false;
        out.push({ src: video.getAttribute("src"), play_error: String(err) });
        continue;
      }
      out.push({ src: video.getAttribute("src"), played, current_time: video.currentTime, ready_state: video.readyState,
                 width: video.videoWidth, height: video.videoHeight, error: video.error ? video.error.code : null });
    }
    return out;
  });
  result.images = await page.evaluate(() =>
    [...document.querySelectorAll("img")].map((img) => ({ src: img.getAttribute("src"), loaded: img.complete && img.naturalWidth > 0 })));
} finally {
  await browser.close();
}
console.log(JSON.stringify(result, null, 2));
