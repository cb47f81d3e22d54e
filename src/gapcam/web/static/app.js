// gapcam page: upload -> POST /api/localize (found in /openapi.json) -> draw on a canvas.
// One request per image: it returns the top-5 classes and each one's normalised map as a small
// grayscale PNG. Switching classes, opacity, colormap and the box threshold happen here, with
// no new request. Every text from the server or the user goes through textContent.
// Camera mode sends the live camera's frames to the same endpoint, one request at a time (see
// cameraLoop), and draws the latest answer over the live picture.
"use strict";

const $ = (id) => document.getElementById(id);
const MAP_SIZE = 512; // max side of the maps we ask for
const PREVIEW_SIZE = 1024; // max side of the decoded image we ask for
const state = {
  api: null, info: null, luts: new Map(), result: null, photo: null, maps: [],
  selected: 0, request: 0, heat: null, heatKey: "",
};

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

// The endpoints and the upload field come from the OpenAPI schema: the page uses the API as
// documented, so the two cannot drift apart.
async function discover() {
  const schema = await getJSON("/openapi.json");
  const ops = {};
  for (const [path, methods] of Object.entries(schema.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      if (op.operationId) ops[op.operationId] = { path, method: method.toUpperCase(), op };
    }
  }
  const form = ops.localize.op.requestBody.content["multipart/form-data"].schema;
  const field = Object.keys(form.properties).find((k) => form.properties[k].format === "binary");
  return { ops, field };
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  $("status").textContent = "";
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function megabytes(bytes) {
  return `${(bytes / 1e6).toFixed(1)} MB`;
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser could not decode an image"));
    image.src = url;
  });
}

async function loadGray(url, width, height) {
  const image = await loadImage(url);
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(image, 0, 0);
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const gray = new Uint8Array(width * height);
  for (let i = 0; i < gray.length; i++) gray[i] = rgba[i * 4];
  return gray;
}

function resetView(stateName) {
  state.result = null;
  state.photo = null;
  state.maps = [];
  $("classes").replaceChildren();
  $("file-name").textContent = "";
  $("box").textContent = "none";
  $("box").dataset.box = "";
  $("canvas").dataset.state = stateName;
  $("download-png").disabled = true;
  $("download-json").disabled = true;
}

async function localize(blob, name) {
  clearError();
  const limit = state.info.max_upload_bytes;
  if (blob.size > limit) {
    resetView("error");
    showError(`${name}: ${megabytes(blob.size)} is over the upload limit of ${megabytes(limit)}`);
    return;
  }
  const id = ++state.request;
  const form = new FormData();
  form.append(state.api.field, blob, name);
  const params = new URLSearchParams({
    threshold: $("threshold").value, map_size: MAP_SIZE, preview: PREVIEW_SIZE,
  });
  const endpoint = state.api.ops.localize;
  $("status").textContent = `Computing ${name}…`;
  $("canvas").dataset.state = "loading";
  let response;
  let body;
  try {
    response = await fetch(`${endpoint.path}?${params}`, { method: endpoint.method, body: form });
    body = await response.json();
  } catch (error) {
    if (id === state.request) {
      resetView("error");
      showError(`${name}: no usable answer from the server (${error.message})`);
    }
    return;
  }
  if (id !== state.request) return; // a newer upload started meanwhile
  if (!response.ok) {
    resetView("error");
    showError(body.error || `${name}: HTTP ${response.status}`);
    return;
  }
  try {
    await show(body, id);
  } catch (error) {
    resetView("error");
    showError(`${name}: ${error.message}`);
  }
}

async function show(body, id) {
  const photo = await loadImage(body.preview);
  const maps = await Promise.all(
    body.maps.map((m) => loadGray(m.map_png, body.map_width, body.map_height)),
  );
  if (id !== state.request) return;
  Object.assign(state, { result: body, photo, maps, selected: 0, heatKey: "" });
  $("file-name").textContent = body.input;
  $("status").textContent =
    `${body.width}×${body.height} px · ${body.model} · ${Math.round(body.elapsed_ms)} ms`;
  for (const note of body.notes) $("status").textContent += ` · ${note}`;
  renderClasses();
  render();
  $("download-png").disabled = false;
  $("download-json").disabled = false;
}

function renderClasses() {
  const list = $("classes");
  list.replaceChildren();
  state.result.maps.forEach((entry, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.index = String(entry.index);
    button.setAttribute("aria-pressed", String(i === state.selected));
    button.style.setProperty("--p", `${(entry.probability * 100).toFixed(1)}%`);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.name;
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = `${(entry.probability * 100).toFixed(1)}%`;
    button.append(name, prob);
    button.addEventListener("click", () => select(i));
    const item = document.createElement("li");
    item.append(button);
    list.append(item);
  });
}

function select(i) {
  state.selected = i;
  for (const [j, button] of [...$("classes").querySelectorAll("button")].entries()) {
    button.setAttribute("aria-pressed", String(j === i));
  }
  render();
}

// Largest 8-connected component of gray >= threshold * 255, as a pixel-edge box in map pixels
// (the same rule as gapcam.boxes on the server); null when nothing is above the threshold.
function largestBox(gray, width, height, threshold) {
  const cut = Math.ceil(threshold * 255 - 1e-6);
  const labels = new Uint8Array(width * height);
  const stack = new Int32Array(width * height);
  let best = null;
  for (let start = 0; start < gray.length; start++) {
    if (labels[start] || gray[start] < cut) continue;
    let top = 0;
    let area = 0;
    let x0 = width, y0 = height, x1 = 0, y1 = 0;
    stack[top++] = start;
    labels[start] = 1;
    while (top > 0) {
      const p = stack[--top];
      const x = p % width;
      const y = (p - x) / width;
      area++;
      if (x < x0) x0 = x;
      if (x + 1 > x1) x1 = x + 1;
      if (y < y0) y0 = y;
      if (y + 1 > y1) y1 = y + 1;
      for (let dy = -1; dy <= 1; dy++) {
        const ny = y + dy;
        if (ny < 0 || ny >= height) continue;
        for (let dx = -1; dx <= 1; dx++) {
          const nx = x + dx;
          if (nx < 0 || nx >= width) continue;
          const q = ny * width + nx;
          if (!labels[q] && gray[q] >= cut) {
            labels[q] = 1;
            stack[top++] = q;
          }
        }
      }
    }
    if (best === null || area > best.area) best = { x0, y0, x1, y1, area };
  }
  return best;
}

function heatCanvas(gray, width, height, lut) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  for (let i = 0; i < gray.length; i++) {
    const v = gray[i] * 3;
    image.data[i * 4] = lut[v];
    image.data[i * 4 + 1] = lut[v + 1];
    image.data[i * 4 + 2] = lut[v + 2];
    image.data[i * 4 + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  return canvas;
}

function render() {
  const body = state.result;
  if (!body) return;
  const entry = body.maps[state.selected];
  const { map_width: mw, map_height: mh } = body;
  const photo = state.photo;
  const width = photo.naturalWidth;
  const height = photo.naturalHeight;
  const font = Math.max(12, Math.round(width / 28));
  const band = Math.round(font * 1.6);
  const canvas = $("canvas");
  if (canvas.width !== width || canvas.height !== height + band) {
    canvas.width = width;
    canvas.height = height + band;
  }
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#141414";
  ctx.fillRect(0, 0, width, band);
  ctx.fillStyle = "#fff";
  ctx.font = `${font}px sans-serif`;
  ctx.textBaseline = "middle";
  const caption = `${entry.name}  ${(entry.probability * 100).toFixed(1)}%`;
  ctx.fillText(caption, font / 2, band / 2, width - font);
  ctx.globalAlpha = 1;
  ctx.drawImage(photo, 0, band, width, height);
  const key = `${state.selected}/${$("colormap").value}`;
  if (key !== state.heatKey) {
    const lut = state.luts.get($("colormap").value);
    state.heat = heatCanvas(state.maps[state.selected], mw, mh, lut);
    state.heatKey = key;
  }
  ctx.imageSmoothingEnabled = true;
  ctx.globalAlpha = Number($("opacity").value);
  ctx.drawImage(state.heat, 0, band, width, height);
  ctx.globalAlpha = 1;
  const box = largestBox(state.maps[state.selected], mw, mh, Number($("threshold").value));
  showBox(box, ctx, band);
  canvas.dataset.state = "ready";
  canvas.dataset.class = String(entry.index);
}

function showBox(box, ctx, band) {
  const body = state.result;
  const output = $("box");
  if (box === null) {
    output.textContent = "none (nothing above the threshold)";
    output.dataset.box = "";
    return;
  }
  // map pixels -> original-image pixels (floor / ceil keep the box around the component)
  const sx = body.width / body.map_width;
  const sy = body.height / body.map_height;
  const xyxy = [
    Math.floor(box.x0 * sx), Math.floor(box.y0 * sy),
    Math.min(body.width, Math.ceil(box.x1 * sx)), Math.min(body.height, Math.ceil(box.y1 * sy)),
  ];
  output.textContent = xyxy.join(" ");
  output.dataset.box = xyxy.join(",");
  const canvas = ctx.canvas;
  const kx = canvas.width / body.width;
  const ky = (canvas.height - band) / body.height;
  const line = Math.max(2, Math.round(Math.min(canvas.width, canvas.height - band) / 150));
  ctx.strokeStyle = "rgb(0, 255, 0)";
  ctx.lineWidth = line;
  ctx.strokeRect(
    xyxy[0] * kx + line / 2, band + xyxy[1] * ky + line / 2,
    (xyxy[2] - xyxy[0]) * kx - line, (xyxy[3] - xyxy[1]) * ky - line,
  );
}

function safeStem(name) {
  const stem = name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9._-]+/g, "_");
  return stem.replace(/^[._]+/, "").slice(0, 60) || "image";
}

function saveBlob(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function downloadPng() {
  const entry = state.result.maps[state.selected];
  const name = `${safeStem(state.result.input)}-cam-${safeStem(entry.name)}.png`;
  $("canvas").toBlob((blob) => saveBlob(blob, name), "image/png");
}

function downloadJson() {
  const body = state.result;
  const maps = body.maps.map(({ map_png: _, ...rest }) => rest);
  const box = $("box").dataset.box;
  const view = {
    class_index: body.maps[state.selected].index,
    threshold: Number($("threshold").value),
    opacity: Number($("opacity").value),
    colormap: $("colormap").value,
    box: box ? box.split(",").map(Number) : null,
  };
  const { preview: _, ...rest } = body;
  const text = JSON.stringify({ ...rest, maps, view }, null, 2);
  saveBlob(new Blob([text], { type: "application/json" }), `${safeStem(body.input)}-cam.json`);
}

function wireInputs() {
  const input = $("file-input");
  input.addEventListener("change", () => {
    const file = input.files[0];
    if (file) localize(file, file.name);
    input.value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) localize(file, file.name);
  });
  for (const id of ["opacity", "threshold"]) {
    $(id).addEventListener("input", () => {
      $(`${id}-value`).textContent = Number($(id).value).toFixed(2);
      render();
      renderCamera();
    });
  }
  $("colormap").addEventListener("change", () => {
    render();
    renderCamera();
  });
  $("mode-image").addEventListener("click", () => setMode("image"));
  $("mode-camera").addEventListener("click", () => setMode("camera"));
  $("camera-toggle").addEventListener("click", () => {
    if (camera.stream) stopCamera("");
    else startCamera();
  });
  $("download-png").addEventListener("click", downloadPng);
  $("download-json").addEventListener("click", downloadJson);
}

function addExamples() {
  for (const example of state.info.examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = example.name;
    button.addEventListener("click", async () => {
      const response = await fetch(example.url);
      if (!response.ok) return showError(`${example.name}: HTTP ${response.status}`);
      localize(await response.blob(), example.name);
    });
    $("examples").append(button);
  }
}

async function start() {
  wireInputs();
  try {
    state.api = await discover();
    state.info = await getJSON(state.api.ops.info.path);
    const colormaps = await getJSON(state.api.ops.colormaps.path);
    for (const cmap of colormaps.colormaps) {
      state.luts.set(cmap.name, Uint8Array.from(cmap.lut));
      const option = document.createElement("option");
      option.value = cmap.name;
      option.textContent = cmap.name;
      option.selected = cmap.name === colormaps.default;
      $("colormap").append(option);
    }
  } catch (error) {
    showError(`cannot start: ${error.message}`);
    return;
  }
  $("threshold").value = state.info.threshold;
  $("threshold-value").textContent = Number(state.info.threshold).toFixed(2);
  $("model-line").textContent =
    `${state.info.model} · ${state.info.num_classes} classes · uploads up to ` +
    `${megabytes(state.info.max_upload_bytes)}`;
  addExamples();
  if (location.hash === "#camera") setMode("camera");
  document.body.dataset.ready = "true";
}

// ---- camera mode ----------------------------------------------------------------------------
// Frames are never queued: the loop holds at most one request in flight, and it captures the
// newest camera frame only when the previous answer has arrived (frames in between are simply
// not captured), so the rate adapts to what the server keeps up with. Frames are downscaled to
// CAMERA_SIDE and sent as JPEG; the answer's top class map (a small grayscale PNG) is coloured,
// thresholded and drawn here, on a canvas over the live <video>.
const CAMERA_SIDE = 320; // max side of the frames sent (the model sees 224 px or so)
const CAMERA_MAP_SIZE = 96; // max side of the map asked for (a 7x7 grid, upsampled)
const CAMERA_QUALITY = 0.85; // JPEG quality of the frames sent
const FPS_WINDOW_MS = 5000; // the achieved rate is measured over the answers of this long
const FRAME_WAIT_MS = 500; // longest wait for a new camera frame before sending the same one
const camera = {
  stream: null, session: 0, latest: null, heat: null, heatKey: "", answers: 0, times: [],
  grab: document.createElement("canvas"), presented: 0, onFrame: null,
};

function setMode(mode) {
  const cameraMode = mode === "camera";
  $("mode-image").setAttribute("aria-pressed", String(!cameraMode));
  $("mode-camera").setAttribute("aria-pressed", String(cameraMode));
  for (const id of ["image-controls", "downloads", "view"]) $(id).hidden = cameraMode;
  for (const id of ["camera-controls", "camera-view"]) $(id).hidden = !cameraMode;
  clearError();
  document.body.dataset.mode = mode;
  if (cameraMode) {
    const problem = cameraProblem();
    if (problem || !camera.stream) showCameraMessage(problem || ""); // no stale message
    $("camera-toggle").disabled = problem !== null;
  } else if (camera.stream) {
    stopCamera("");
  }
  history.replaceState(null, "", cameraMode ? "#camera" : location.pathname + location.search);
}

// Why this page cannot use a camera at all, or null. Browsers give getUserMedia only to secure
// contexts: https pages, and http on localhost / 127.0.0.1 / [::1].
function cameraProblem() {
  if (!window.isSecureContext) {
    return `The camera is not available here: browsers allow cameras only on localhost or ` +
      `over https, and this page is ${location.origin}. Open it on the machine that runs ` +
      `gapcam serve as http://localhost:${location.port || "80"}/ (or 127.0.0.1), or serve ` +
      `it over https (a reverse proxy with a certificate).`;
  }
  if (!navigator.mediaDevices || typeof navigator.mediaDevices.getUserMedia !== "function") {
    return "The camera is not available: this browser gives the page no camera access " +
      "(navigator.mediaDevices is missing). Try a current Chrome, Firefox or Safari.";
  }
  return null;
}

function cameraErrorMessage(error) {
  switch (error && error.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Camera permission was denied. Allow the camera for this page in the browser " +
        "(the camera icon in the address bar, or the site settings), then press Start camera.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No camera was found: connect one and press Start camera.";
    case "NotReadableError":
    case "AbortError":
      return "The camera could not be started: another application may be using it.";
    default:
      return `The camera could not be started (${error && error.name}: ${error && error.message}).`;
  }
}

function showCameraMessage(message) {
  $("camera-message").textContent = message;
  $("camera-message").hidden = !message;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function startCamera() {
  const problem = cameraProblem();
  showCameraMessage(problem || "");
  if (problem) return;
  $("camera-toggle").disabled = true;
  $("camera-status").textContent = "Asking for the camera…";
  // a new start: nothing of the last run (its answers, its error) stands meanwhile
  $("camera-canvas").dataset.state = "starting";
  $("camera-canvas").dataset.answers = "0";
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      // a phone's back camera, which looks at what is in front of it, where there is one
      video: {
        width: { ideal: 640 }, height: { ideal: 480 }, facingMode: { ideal: "environment" },
      },
      audio: false,
    });
  } catch (error) {
    $("camera-toggle").disabled = false;
    $("camera-status").textContent = "";
    $("camera-canvas").dataset.state = "error";
    showCameraMessage(cameraErrorMessage(error));
    return;
  }
  $("camera-toggle").disabled = false;
  if (document.body.dataset.mode !== "camera") { // left camera mode while the browser asked
    for (const track of stream.getTracks()) track.stop();
    $("camera-canvas").dataset.state = "off";
    $("camera-status").textContent = "";
    return;
  }
  const video = $("camera-video");
  video.srcObject = stream;
  try {
    await video.play();
  } catch (error) {
    for (const track of stream.getTracks()) track.stop();
    video.srcObject = null;
    $("camera-canvas").dataset.state = "error";
    $("camera-status").textContent = "";
    showCameraMessage(cameraErrorMessage(error));
    return;
  }
  Object.assign(camera, {
    stream, latest: null, heatKey: "", answers: 0, times: [], presented: 0, onFrame: null,
  });
  $("camera-toggle").textContent = "Stop camera";
  $("camera-canvas").dataset.state = "running";
  $("camera-canvas").dataset.answers = "0";
  for (const track of stream.getVideoTracks()) track.addEventListener("ended", () => {
    if (camera.stream === stream) stopCamera("The camera stopped (unplugged or turned off).");
  });
  const session = ++camera.session;
  $("camera-status").textContent = "Camera on; waiting for the first answer…";
  countFrames(video, session);
  cameraLoop(session);
}

// Counts the frames the <video> presents (where the browser says: requestVideoFrameCallback),
// so that a server faster than the camera is not sent the same frame twice.
function countFrames(video, session) {
  if (typeof video.requestVideoFrameCallback !== "function") return;
  const onFrame = (now, meta) => {
    if (session !== camera.session) return;
    camera.presented = meta.presentedFrames;
    if (camera.onFrame) camera.onFrame();
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

// Resolves once the video shows a frame after the ``after``-th (at once where frames are not
// counted), or after FRAME_WAIT_MS.
function newFrame(after) {
  if (typeof HTMLVideoElement.prototype.requestVideoFrameCallback !== "function") {
    return Promise.resolve();
  }
  if (camera.presented > after) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, FRAME_WAIT_MS);
    function done() {
      clearTimeout(timer);
      if (camera.onFrame === done) camera.onFrame = null;
      resolve();
    }
    camera.onFrame = done;
  });
}

function stopCamera(message) {
  camera.session++; // the running loop sees it and ends; an answer on its way is ignored
  if (camera.onFrame) camera.onFrame(); // a loop waiting for a frame: wake it to end
  if (camera.stream) for (const track of camera.stream.getTracks()) track.stop();
  camera.stream = null;
  camera.latest = null;
  $("camera-video").srcObject = null;
  $("camera-toggle").textContent = "Start camera";
  $("camera-toggle").disabled = false;
  $("camera-canvas").dataset.state = message ? "error" : "off";
  $("camera-status").textContent = "";
  showCameraMessage(message);
  renderCamera();
}

// The newest frame, downscaled to CAMERA_SIDE, as a JPEG blob; null before the first frame.
function grabFrame() {
  const video = $("camera-video");
  const width = video.videoWidth;
  const height = video.videoHeight;
  if (!width || !height) return Promise.resolve(null);
  const scale = Math.min(1, CAMERA_SIDE / Math.max(width, height));
  const grab = camera.grab;
  grab.width = Math.max(1, Math.round(width * scale));
  grab.height = Math.max(1, Math.round(height * scale));
  grab.getContext("2d").drawImage(video, 0, 0, grab.width, grab.height);
  return new Promise((resolve) => grab.toBlob(resolve, "image/jpeg", CAMERA_QUALITY));
}

async function cameraLoop(session) {
  const endpoint = state.api.ops.localize;
  let sent = -1; // the number of the frame sent last
  while (session === camera.session) {
    await newFrame(sent);
    if (session !== camera.session) return;
    sent = camera.presented;
    const blob = await grabFrame();
    if (session !== camera.session) return;
    if (!blob) {
      await sleep(50);
      continue;
    }
    const form = new FormData();
    form.append(state.api.field, blob, "camera.jpg");
    const params = new URLSearchParams({
      threshold: $("threshold").value, map_size: CAMERA_MAP_SIZE, preview: 0,
    });
    let response;
    let body;
    try {
      response = await fetch(`${endpoint.path}?${params}`, { method: endpoint.method, body: form });
      body = await response.json();
    } catch (error) {
      if (session === camera.session) {
        stopCamera(`No usable answer from the server (${error.message}); camera stopped.`);
      }
      return;
    }
    if (session !== camera.session) return;
    if (response.status === 429 || response.status === 503) { // busy: wait as told, go on
      const wait = Number(response.headers.get("Retry-After")) || 1;
      $("camera-status").textContent = `Server busy; retrying in ${wait} s…`;
      await sleep(Math.min(wait, 10) * 1000);
      continue;
    }
    if (!response.ok) {
      stopCamera(`The server refused a frame: ${body.error || `HTTP ${response.status}`}`);
      return;
    }
    let gray;
    try {
      gray = await loadGray(body.maps[0].map_png, body.map_width, body.map_height);
    } catch (error) {
      if (session === camera.session) stopCamera(`An answer could not be drawn: ${error.message}`);
      return;
    }
    if (session !== camera.session) return;
    const now = performance.now();
    camera.times.push(now);
    while (camera.times.length > 2 && now - camera.times[0] > FPS_WINDOW_MS) camera.times.shift();
    camera.answers++;
    camera.latest = { body, gray };
    camera.heatKey = "";
    showCameraAnswer(body);
    renderCamera();
  }
}

// Analysed frames a second over the last FPS_WINDOW_MS (0 until two answers came).
function achievedFps() {
  const times = camera.times;
  if (times.length < 2) return 0;
  return (times.length - 1) / ((times[times.length - 1] - times[0]) / 1000);
}

function showCameraAnswer(body) {
  const fps = achievedFps();
  const output = $("camera-fps");
  output.textContent = `${fps.toFixed(1)} frames/s analysed`;
  output.dataset.fps = fps.toFixed(2);
  const track = camera.stream && camera.stream.getVideoTracks()[0];
  const rate = track && track.getSettings ? track.getSettings().frameRate : null;
  $("camera-status").textContent =
    `${body.model} · ${Math.round(body.elapsed_ms)} ms a frame on the server` +
    (rate ? ` · the camera gives ${Math.round(rate)} frames/s` : "");
  const list = $("camera-classes");
  list.replaceChildren();
  for (const entry of body.maps) {
    const item = document.createElement("li");
    item.dataset.index = String(entry.index);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.name;
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = `${(entry.probability * 100).toFixed(1)}%`;
    item.append(name, prob);
    list.append(item);
  }
}

// The overlay canvas, at the camera's own size, over the <video>: the latest answer's heatmap,
// its box at the page's threshold and a caption; transparent where there is nothing to draw.
function renderCamera() {
  const canvas = $("camera-canvas");
  const video = $("camera-video");
  const latest = camera.latest;
  const ctx = canvas.getContext("2d");
  if (!latest) {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    $("camera-box").textContent = "none";
    $("camera-box").dataset.box = "";
    return;
  }
  const width = video.videoWidth || latest.body.width;
  const height = video.videoHeight || latest.body.height;
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  ctx.clearRect(0, 0, width, height);
  const { body, gray } = latest;
  const entry = body.maps[0];
  const { map_width: mw, map_height: mh } = body;
  const key = $("colormap").value;
  if (key !== camera.heatKey) {
    camera.heat = heatCanvas(gray, mw, mh, state.luts.get(key));
    camera.heatKey = key;
  }
  ctx.imageSmoothingEnabled = true;
  ctx.globalAlpha = Number($("opacity").value);
  ctx.drawImage(camera.heat, 0, 0, width, height);
  ctx.globalAlpha = 1;
  const box = largestBox(gray, mw, mh, Number($("threshold").value));
  const output = $("camera-box");
  if (box === null) {
    output.textContent = "none (nothing above the threshold)";
    output.dataset.box = "";
  } else {
    // map pixels -> camera pixels, outwards to whole pixels
    const sx = width / mw;
    const sy = height / mh;
    const xyxy = [
      Math.floor(box.x0 * sx), Math.floor(box.y0 * sy),
      Math.min(width, Math.ceil(box.x1 * sx)), Math.min(height, Math.ceil(box.y1 * sy)),
    ];
    output.textContent = xyxy.join(" ");
    output.dataset.box = xyxy.join(",");
    const line = Math.max(2, Math.round(Math.min(width, height) / 150));
    ctx.strokeStyle = "rgb(0, 255, 0)";
    ctx.lineWidth = line;
    ctx.strokeRect(
      xyxy[0] + line / 2, xyxy[1] + line / 2, xyxy[2] - xyxy[0] - line, xyxy[3] - xyxy[1] - line,
    );
  }
  const font = Math.max(12, Math.round(width / 28));
  const band = Math.round(font * 1.6);
  ctx.fillStyle = "rgba(20, 20, 20, 0.75)";
  ctx.fillRect(0, 0, width, band);
  ctx.fillStyle = "#fff";
  ctx.font = `${font}px sans-serif`;
  ctx.textBaseline = "middle";
  ctx.fillText(`${entry.name}  ${(entry.probability * 100).toFixed(1)}%`, font / 2, band / 2,
    width - font);
  canvas.dataset.class = String(entry.index);
  canvas.dataset.answers = String(camera.answers);
}

start();
