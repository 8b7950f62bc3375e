// ComfyUI-TCAN scrubber: a frame slider with play/pause and the frame number on the nodes that
// output a clip (pose, TPC, PTM), showing that node's preview frames after it ran.
//
// The frames come from ComfyUI's normal image outputs (ui.images: small JPEGs in the temp folder,
// written by nodes/previews.py). They are loaded one at a time as the slider moves (a small cache,
// a few frames read ahead while playing), never all at once: the stock preview would load every
// listed image, which freezes the page on a 2,000-frame clip, so it is turned off on these nodes.
// ui.tcan_marks ([{frame, reasons}]) is drawn as ticks on the timeline; ui.tcan_pose (TCAN Pose
// Edit) draws the body keypoints, and dragging one writes a "move" edit into the node's "edits"
// widget, so the fix is saved, shared and undone with the workflow.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SCRUB_NODES = new Set([
  "TCANPoseExtract", "TCANPoseSmooth", "TCANPoseRetarget", "TCANPoseRender", "TCANPoseLoad",
  "TCANPoseEdit", "TCANTPCCalibrate", "TCANPTM",
]);
const WIDGET = "tcan_scrubber";
const EDITS = "edits";
const CACHE_FRAMES = 48;
const READ_AHEAD = 4;
const PLAY_FPS = 12;
const HANDLE_PX = 5;
const PICK_PX = 12;

function el(tag, style, props = {}) {
  const e = document.createElement(tag);
  Object.assign(e.style, style);
  Object.assign(e, props);
  return e;
}

class Scrubber {
  constructor(node) {
    this.node = node;
    this.sendsFrames = false;
    this.frames = [];
    this.marks = [];
    this.pose = null;
    this.frame = 0;
    this.cache = new Map();
    this.timer = null;
    this.drag = null;
    this.drawRect = null;
    this.shown = null;

    this.root = el("div", { display: "flex", flexDirection: "column", gap: "3px", width: "100%", height: "100%",
                             boxSizing: "border-box", fontSize: "11px", color: "#ccc" }, { className: "tcan-scrubber" });
    this.canvas = el("canvas", { flex: "1 1 auto", minHeight: "80px", width: "100%", background: "#111",
                                 borderRadius: "4px", touchAction: "none" }, { className: "tcan-view" });
    this.marksBar = el("div", { position: "relative", height: "6px", background: "#2a2a2a", borderRadius: "3px" },
                       { className: "tcan-marks" });
    const controls = el("div", { display: "flex", alignItems: "center", gap: "6px" });
    this.playButton = el("button", { minWidth: "28px", cursor: "pointer" }, { className: "tcan-play", textContent: "▶",
                                                                              title: "play / pause" });
    this.slider = el("input", { flex: "1 1 auto" }, { className: "tcan-slider", type: "range", min: 0, max: 0, value: 0 });
    this.label = el("span", { whiteSpace: "nowrap", minWidth: "70px", maxWidth: "55%", overflow: "hidden",
                              textOverflow: "ellipsis", textAlign: "right" },
                    { className: "tcan-frame", textContent: "not run yet" });
    controls.append(this.playButton, this.slider, this.label);
    this.root.append(this.canvas, this.marksBar, controls);

    this.slider.addEventListener("input", () => this.show(Number(this.slider.value)));
    this.playButton.addEventListener("click", () => this.toggle());
    this.canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    this.canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
    this.canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
    this.root.addEventListener("keydown", (ev) => ev.stopPropagation());
    new ResizeObserver(() => this.draw()).observe(this.canvas);
  }

  // A node's run result: ui.images (frames), ui.tcan_marks, ui.tcan_pose.
  setOutput(message) {
    this.stop();
    this.root.dataset.nodeId = String(this.node.id);
    this.sendsFrames = Array.isArray(message?.images);
    this.frames = message?.images ?? [];
    this.marks = message?.tcan_marks ?? [];
    this.pose = message?.tcan_pose?.[0] ?? null;
    this.cache.clear();
    this.shown = null;
    this.outputAt = performance.now();
    this.firstFrameMs = null;
    this.slider.max = Math.max(0, this.frames.length - 1);
    this.drawMarks();
    this.show(Math.min(this.frame, Math.max(0, this.frames.length - 1)));
  }

  url(i) {
    const params = new URLSearchParams(this.frames[i]);
    return api.apiURL(`/view?${params}`);
  }

  image(i) {
    let img = this.cache.get(i);
    if (img) {
      this.cache.delete(i);
      this.cache.set(i, img); // most recently used last
      return img;
    }
    img = new Image();
    img.onload = () => { if (i === this.frame) this.draw(); };
    img.onerror = () => { if (i === this.frame) this.setLabel(`frame ${i}: could not load its preview`); };
    img.src = this.url(i);
    this.cache.set(i, img);
    while (this.cache.size > CACHE_FRAMES) this.cache.delete(this.cache.keys().next().value);
    return img;
  }

  show(i) {
    const n = this.frames.length;
    this.root.dataset.count = String(n);
    if (n === 0) {
      this.frame = 0;
      this.root.dataset.frame = "";
      this.setLabel(this.sendsFrames ? "no frames: this node's output has 0 frames" : "no preview frames from this node");
      this.draw();
      return;
    }
    this.frame = Math.max(0, Math.min(n - 1, i));
    this.slider.value = String(this.frame);
    this.root.dataset.frame = String(this.frame);
    const flagged = this.marks.find((m) => m.frame === this.frame);
    this.setLabel(`frame ${this.frame} / ${n - 1}` + (flagged ? ` ⚠ ${flagged.reasons.join(", ")}` : ""));
    this.image(this.frame);
    if (this.timer) for (let k = 1; k <= READ_AHEAD && k < n; k++) this.image((this.frame + k) % n);
    this.draw();
  }

  setLabel(text) {
    this.label.textContent = text;
    this.label.title = text;
  }

  toggle() {
    if (this.timer) this.stop();
    else if (this.frames.length > 1) {
      this.timer = setInterval(() => this.show((this.frame + 1) % this.frames.length), 1000 / PLAY_FPS);
      this.playButton.textContent = "⏸";
    }
  }

  stop() {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.playButton.textContent = "▶";
  }

  drawMarks() {
    this.marksBar.replaceChildren();
    const n = this.frames.length;
    this.root.dataset.marks = String(this.marks.length);
    if (n === 0) return;
    for (const mark of this.marks) {
      if (mark.frame < 0 || mark.frame >= n) continue;
      const tick = el("div", { position: "absolute", top: "0", bottom: "0", width: "3px", marginLeft: "-1px",
                               left: `${n > 1 ? (100 * mark.frame) / (n - 1) : 0}%`, background: "#e8a33a",
                               cursor: "pointer" },
                      { className: "tcan-mark", title: `frame ${mark.frame}: ${(mark.reasons ?? []).join(", ")}` });
      tick.dataset.frame = String(mark.frame);
      tick.addEventListener("click", () => { this.stop(); this.show(mark.frame); });
      this.marksBar.append(tick);
    }
  }

  draw() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(c.clientWidth * dpr));
    const h = Math.max(1, Math.round(c.clientHeight * dpr));
    if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
    const ctx = c.getContext("2d");
    const img = this.frames.length ? this.cache.get(this.frame) : null;
    if (!img || !img.complete || !img.naturalWidth) {
      if (!this.frames.length) { ctx.clearRect(0, 0, w, h); this.drawRect = null; }
      return; // keep the last frame until this one arrives
    }
    const scale = Math.min(w / img.naturalWidth, h / img.naturalHeight);
    const dw = img.naturalWidth * scale, dh = img.naturalHeight * scale;
    this.drawRect = { x: (w - dw) / 2, y: (h - dh) / 2, w: dw, h: dh, dpr };
    ctx.clearRect(0, 0, w, h);
    ctx.drawImage(img, this.drawRect.x, this.drawRect.y, dw, dh);
    this.shown = this.frame;
    this.firstFrameMs ??= performance.now() - this.outputAt; // time to first frame (tests report it)
    this.root.dataset.shown = this.frames[this.frame].filename;
    this.drawHandles(ctx);
  }

  // Pose canvas pixels <-> canvas pixels of the drawn image.
  toCanvas(x, y) {
    const r = this.drawRect;
    return [r.x + (x / this.pose.width) * r.w, r.y + (y / this.pose.height) * r.h];
  }

  toPose(cx, cy) {
    const r = this.drawRect;
    return [((cx - r.x) / r.w) * this.pose.width, ((cy - r.y) / r.h) * this.pose.height];
  }

  people() {
    return this.pose?.frames?.[this.frame] ?? [];
  }

  drawHandles(ctx) {
    if (!this.pose || !this.editsWidget()) return;
    const dpr = this.drawRect.dpr;
    this.people().forEach((points, p) => points.forEach(([x, y, conf], k) => {
      if (conf <= 0) return;
      const [cx, cy] = this.toCanvas(x, y);
      const active = this.drag && this.drag.person === p && this.drag.point === k;
      ctx.beginPath();
      ctx.arc(cx, cy, HANDLE_PX * dpr, 0, 2 * Math.PI);
      ctx.fillStyle = active ? "rgba(255,220,0,0.9)" : "rgba(255,255,255,0.35)";
      ctx.strokeStyle = "rgba(0,0,0,0.8)";
      ctx.fill();
      ctx.stroke();
    }));
  }

  editsWidget() {
    return this.node.widgets?.find((w) => w.name === EDITS);
  }

  eventPoint(e) {
    // The graph's zoom scales the element with a CSS transform: measure on screen, map to canvas pixels.
    const rect = this.canvas.getBoundingClientRect();
    return [((e.clientX - rect.left) * this.canvas.width) / rect.width,
            ((e.clientY - rect.top) * this.canvas.height) / rect.height];
  }

  onPointerDown(e) {
    if (!this.pose || !this.drawRect || !this.editsWidget() || e.button !== 0) return;
    const [cx, cy] = this.eventPoint(e);
    let best = null;
    this.people().forEach((points, p) => points.forEach(([x, y, conf], k) => {
      if (conf <= 0) return;
      const [hx, hy] = this.toCanvas(x, y);
      const d = Math.hypot(hx - cx, hy - cy);
      if (d <= PICK_PX * this.drawRect.dpr && (!best || d < best.d)) best = { d, person: p, point: k };
    }));
    if (!best) return;
    e.preventDefault();
    e.stopPropagation();
    this.stop();
    this.canvas.setPointerCapture(e.pointerId);
    this.drag = { person: best.person, point: best.point, frame: this.frame };
  }

  onPointerMove(e) {
    if (!this.drag) return;
    e.stopPropagation();
    const [x, y] = this.toPose(...this.eventPoint(e));
    const pt = this.people()[this.drag.person][this.drag.point];
    pt[0] = x;
    pt[1] = y;
    this.draw();
  }

  onPointerUp(e) {
    if (!this.drag) return;
    e.stopPropagation();
    const { person, point, frame } = this.drag;
    const [x, y] = this.toPose(...this.eventPoint(e));
    this.drag = null;
    this.writeMove(frame, person, point, Math.round(x * 10) / 10, Math.round(y * 10) / 10);
    this.draw();
  }

  // Replace an earlier move of the same point on the same frame, then append: the last drag wins.
  writeMove(frame, person, point, x, y) {
    const widget = this.editsWidget();
    let edits = [];
    try {
      edits = JSON.parse(widget.value || "[]");
      if (!Array.isArray(edits)) throw new Error("not a list");
    } catch (err) {
      this.setLabel(`cannot add the move: the edits text is not a JSON list (${err.message}); fix it first`);
      return;
    }
    edits = edits.filter((m) => !(m?.op === "move" && m.frame === frame && (m.person ?? 0) === person
                                   && m.point === point && (m.part ?? "body") === "body"));
    edits.push({ op: "move", frame, person, point, x, y });
    widget.value = JSON.stringify(edits);
    widget.callback?.(widget.value);
    this.node.setDirtyCanvas?.(true, true);
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
    this.setLabel(`frame ${frame}: point ${point} moved to ${x}, ${y} (queue to apply)`);
  }
}

app.registerExtension({
  name: "TCAN.Scrubber",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SCRUB_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const scrubber = new Scrubber(this);
      const widget = this.addDOMWidget(WIDGET, "tcan_scrubber", scrubber.root, { hideOnZoom: false, serialize: false });
      widget.serialize = false;
      widget.computeLayoutSize = () => ({ minHeight: 180, minWidth: 240 });
      this.tcanScrubber = scrubber;
      this.setSize([Math.max(this.size[0], 320), Math.max(this.size[1], this.computeSize()[1])]);
      return r;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.tcanScrubber?.stop();
      return onRemoved?.apply(this, arguments);
    };
    // The stock preview loads every image of ui.images at once; the scrubber loads on demand instead.
    nodeType.prototype.onDrawBackground = function () {};
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      this.imgs = undefined;
      this.tcanScrubber?.setOutput(message);
    };
  },
});

export { Scrubber };
