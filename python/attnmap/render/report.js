// attnmap's report viewer: mounts on <div class="attnmap-report" id=X> with its data in <script id=X-data>.
// The heatmap is made as the Rust render core makes it (rust/src/{normalize,resize,colormap,render}.rs):
// float32 arithmetic (Math.fround after every operation), torch's bilinear align_corners=False taps,
// matplotlib's colour levels floor(256 x) and the same constant-alpha blend, so the canvas holds the
// bytes attnmap.render.frames gives for the map the page carries.
var attnmapReport = window.attnmapReport || (function () {
  "use strict";
  const fr = Math.fround;
  const LEVELS = 256;

  function bytes(b64) {
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function floats(entry) {
    const b = bytes(entry.f32);
    return new Float32Array(b.buffer, 0, b.length / 4);
  }
  // a quantised map back to float32: lo + q * ((hi - lo) / 255), as report.dequantize
  function dequantize(entry) {
    const q = bytes(entry.q);
    const out = new Float32Array(q.length);
    const step = (entry.hi - entry.lo) / 255;
    for (let i = 0; i < q.length; i++) out[i] = entry.lo + q[i] * step;
    for (const i of entry.bad || []) out[i] = NaN;
    return out;
  }

  // -- resize taps (rust/src/resize.rs Taps::linear and Taps::stride) --------------------------------
  function linearTaps(nIn, nOut) {
    const scale = fr(nIn / nOut);
    const t = { i0: new Int32Array(nOut), i1: new Int32Array(nOut), w: new Float32Array(nOut), k: new Float32Array(nOut) };
    for (let i = 0; i < nOut; i++) {
      let src = fr(fr(scale * fr(i + 0.5)) - 0.5);
      if (!(src > 0)) src = 0;
      const a = Math.min(Math.trunc(src), nIn - 1);
      const b = Math.min(a + 1, nIn - 1);
      t.i0[i] = a; t.i1[i] = b; t.w[i] = b > a ? fr(src - a) : 0; t.k[i] = fr(1 - t.w[i]);
    }
    return t;
  }
  function strideTaps(nIn, stride) {
    const nOut = 1 + (nIn - 1) * stride;
    const t = { i0: new Int32Array(nOut), i1: new Int32Array(nOut), w: new Float32Array(nOut), k: new Float32Array(nOut) };
    for (let i = 0; i < nOut; i++) { t.i0[i] = t.i1[i] = Math.ceil(i / stride); t.k[i] = 1; }
    return t;
  }

  // -- normalisation (analysis.normalization.bounds + render.videos.map_range + normalize.rs scale) ----
  function finiteRange(v, start, stop) {
    let lo = Infinity, hi = -Infinity;
    for (let i = start; i < stop; i++) { const x = v[i]; if (Number.isFinite(x)) { if (x < lo) lo = x; if (x > hi) hi = x; } }
    return lo <= hi ? [lo, hi] : null;
  }
  function percentile(sorted, q) {
    const rank = q / 100 * (sorted.length - 1);
    const i = Math.floor(rank), frac = rank - i;
    return i + 1 < sorted.length ? sorted[i] + frac * (sorted[i + 1] - sorted[i]) : sorted[i];
  }
  // [lo, hi] of every frame
  function ranges(v, frames, mode, vmin, vmax) {
    const n = v.length / frames;
    const has = (x) => x !== null && x !== undefined;
    if (mode === "frame") {
      const out = [];
      for (let f = 0; f < frames; f++) {
        const r = finiteRange(v, f * n, (f + 1) * n) || [0, 0];
        out.push([has(vmin) ? vmin : r[0], has(vmax) ? vmax : r[1]]);
      }
      return out;
    }
    let lo, hi;
    const whole = finiteRange(v, 0, v.length);
    if (mode === "fixed") { lo = vmin; hi = vmax; }
    else if (mode === "none" || whole === null) { lo = 0; hi = 1; }
    else {
      if (mode === "percentile") {
        const finite = Array.from(v).filter(Number.isFinite).sort((a, b) => a - b);
        lo = percentile(finite, 1); hi = percentile(finite, 99);
      } else if (mode === "global") { lo = whole[0]; hi = whole[1]; }
      else if (mode === "max") { lo = 0; hi = whole[1]; }
      else { lo = 0; hi = 0; for (const x of v) if (Number.isFinite(x)) hi += x; }
      if (has(vmin)) lo = vmin;
      if (has(vmax)) hi = vmax;
    }
    if (!(hi > lo)) hi = lo + 1;
    return new Array(frames).fill([lo, hi]);
  }
  function normalized(v, frames, rs) {
    const n = v.length / frames;
    const out = new Float32Array(v.length);
    for (let f = 0; f < frames; f++) {
      const [lo, hi] = rs[f];
      for (let i = f * n; i < (f + 1) * n; i++) {
        const x = v[i];
        if (!Number.isFinite(x) || !(hi > lo)) { out[i] = 0; continue; }
        const t = (x - lo) / (hi - lo);
        out[i] = t < 0 ? 0 : t > 1 ? 1 : t;
      }
    }
    return out;
  }

  // -- one output frame (render.rs: column pass in level space, row lerp, level, colour, blend) ------
  function paint(norm, grid, taps, t, table, bg, alpha, out) {
    const [, h, w] = grid;
    const T = taps.t, Y = taps.y, X = taps.x;
    const W = X.w.length, H = Y.w.length;
    const f0 = T.i0[t] * h * w, f1 = T.i1[t] * h * w, wt = T.w[t], kt = T.k[t];
    const mixed = new Float32Array(w);
    const cols = new Float32Array(h * W);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const a = norm[f0 + y * w + x];
        mixed[x] = wt === 0 ? a : fr(fr(kt * a) + fr(wt * norm[f1 + y * w + x]));
      }
      for (let x = 0; x < W; x++) {
        cols[y * W + x] = fr(fr(X.k[x] * mixed[X.i0[x]]) + fr(X.w[x] * mixed[X.i1[x]])) * LEVELS;
      }
    }
    const a32 = fr(alpha), keep = fr(1 - a32);
    for (let y = 0; y < H; y++) {
      const r0 = Y.i0[y] * W, r1 = Y.i1[y] * W, wy = Y.w[y], ky = Y.k[y];
      for (let x = 0; x < W; x++) {
        const s = fr(fr(ky * cols[r0 + x]) + fr(wy * cols[r1 + x]));
        const level = s > 0 ? (s < 255 ? Math.floor(s) : 255) : 0;
        const o = (y * W + x) * 4;
        for (let c = 0; c < 3; c++) {
          const colour = table[level * 3 + c];
          out[o + c] = bg ? Math.floor(fr(fr(bg[o + c] * keep) + fr(fr(colour * a32) + 0.5))) : colour;
        }
        out[o + 3] = 255;
      }
    }
  }

  // -- small helpers ---------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v; else if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  function select(role, label, options, value) {
    const s = el("select", { "data-role": role, "aria-label": label });
    for (const [v, text] of options) s.append(el("option", { value: String(v), text: String(text) }));
    s.value = String(value);
    return el("label", { class: "am-control" }, el("span", { text: label }), s);
  }
  function fmt(x) {
    if (!Number.isFinite(x)) return String(x);
    const a = Math.abs(x);
    return a !== 0 && (a < 1e-3 || a >= 1e4) ? x.toExponential(2) : x.toPrecision(3).replace(/\.?0+$/, "");
  }
  function ticks(lo, hi, count) {
    const out = [];
    for (let i = 0; i < count; i++) out.push(lo + (hi - lo) * i / (count - 1));
    return out;
  }

  // a matrix (rows x cols) drawn cell by cell with values on hover
  function matrix(values, rows, cols, table, opts) {
    const cell = Math.max(2, Math.min(24, Math.floor((opts.size || 260) / Math.max(rows, cols))));
    const canvas = el("canvas", { width: cols * cell, height: rows * cell, "data-role": opts.role || "matrix", class: "am-matrix" });
    const ctx = canvas.getContext("2d");
    const r = finiteRange(values, 0, values.length) || [0, 1];
    const span = r[1] > r[0] ? r[1] - r[0] : 1;
    const img = ctx.createImageData(cols * cell, rows * cell);
    for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) {
      const v = values[i * cols + j];
      const level = Number.isFinite(v) ? Math.min(255, Math.max(0, Math.floor((v - r[0]) / span * 256))) : 0;
      for (let y = 0; y < cell; y++) for (let x = 0; x < cell; x++) {
        const o = ((i * cell + y) * cols * cell + j * cell + x) * 4;
        img.data[o] = table[level * 3]; img.data[o + 1] = table[level * 3 + 1]; img.data[o + 2] = table[level * 3 + 2]; img.data[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    const readout = el("div", { class: "am-readout", "data-role": (opts.role || "matrix") + "-value", text: "hover for values" });
    canvas.addEventListener("mousemove", (ev) => {
      const box = canvas.getBoundingClientRect();
      const j = Math.floor((ev.clientX - box.left) / box.width * cols), i = Math.floor((ev.clientY - box.top) / box.height * rows);
      if (i < 0 || j < 0 || i >= rows || j >= cols) return;
      const name = (k, labels) => (labels ? labels[k] + " (" + k + ")" : String(k));
      readout.textContent = (opts.rowName || "row") + " " + name(i, opts.labels) + " \u2192 " + (opts.colName || "col") + " " + name(j, opts.labels) + ": " + fmt(values[i * cols + j]);
    });
    const range = el("div", { class: "am-note", text: "colour: " + fmt(r[0]) + " \u2026 " + fmt(r[1]) });
    return el("div", { class: "am-matrix-box" }, canvas, readout, range);
  }

  // a line of values with the value under the mouse
  function line(values, opts) {
    const width = 300, height = 90;
    const canvas = el("canvas", { width, height, class: "am-line", "data-role": opts.role || "line" });
    const ctx = canvas.getContext("2d");
    const r = finiteRange(values, 0, values.length) || [0, 1];
    const span = r[1] > r[0] ? r[1] - r[0] : 1;
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, width, height);
    ctx.strokeStyle = "#1f5fa8"; ctx.beginPath();
    for (let i = 0; i < values.length; i++) {
      const x = values.length > 1 ? i / (values.length - 1) * (width - 1) : width / 2;
      const y = height - 4 - (Number.isFinite(values[i]) ? (values[i] - r[0]) / span : 0) * (height - 8);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    }
    ctx.stroke();
    const readout = el("div", { class: "am-readout", text: (opts.xName || "index") + ": hover for values" });
    canvas.addEventListener("mousemove", (ev) => {
      const box = canvas.getBoundingClientRect();
      const i = Math.round((ev.clientX - box.left) / box.width * (values.length - 1));
      if (i >= 0 && i < values.length) readout.textContent = (opts.xName || "index") + " " + i + ": " + fmt(values[i]);
    });
    return el("div", { class: "am-line-box" }, canvas, readout, el("div", { class: "am-note", text: "range " + fmt(r[0]) + " \u2026 " + fmt(r[1]) }));
  }

  // -- the viewer ------------------------------------------------------------------------------------
  class Viewer {
    constructor(root, data) {
      this.root = root;
      this.data = data;
      this.tables = {};
      for (const [name, b64] of Object.entries(data.colormaps)) this.tables[name] = bytes(b64);
      const o = data.options;
      this.state = { video: 0, token: null, step: "mean", block: "all", head: "mean", branch: "cond", frame: 0,
        alpha: o.alpha, colormap: o.colormap, normalize: o.normalize };
      this.cache = new Map();
      this.backgrounds = new Map();
      this.queue = Promise.resolve();
      this.busy = 0;
      this.generation = 0;
      root.dataset.busy = "0";
      root.dataset.rendered = "0";
      root.addEventListener("error", (e) => console.error(e));
      this.build();
    }

    get video() { return this.data.videos[this.state.video]; }

    build() {
      const v = this.video, s = this.state;
      if (!v.tokens.includes(s.token)) s.token = v.tokens[0];
      if (!v.branches.includes(s.branch)) s.branch = v.branches[0];
      s.step = "mean"; s.block = "all"; s.head = "mean"; s.frame = Math.min(s.frame, v.frames - 1);
      const [F, h, w] = v.grid;
      this.taps = {
        t: v.time.stride ? strideTaps(F, v.time.stride) : linearTaps(F, v.time.frames),
        y: linearTaps(h, v.size[0]),
        x: linearTaps(w, v.size[1]),
      };
      this.root.replaceChildren();
      const head = el("header", { class: "am-head" },
        el("h2", { text: v.id }),
        el("div", { class: "am-note", text: [v.model, v.prompt ? "\u201c" + v.prompt + "\u201d" : null,
          "latent grid " + v.grid.join(" x ") + ", " + v.frames + " frames of " + v.size[1] + " x " + v.size[0] + " at " + fmt(v.fps) + " fps",
          v.steps.length + " steps"].filter(Boolean).join(" \u00b7 ") }));
      const controls = el("div", { class: "am-controls" });
      const d = this.data;
      controls.append(select("video", "video", d.videos.map((x, i) => [i, x.id]), s.video));
      controls.append(select("token", "token", v.tokens.map((t) => [t, t]), s.token));
      controls.append(select("step", "step", [["mean", "mean of steps"], ...v.steps.map((x) => [x, x])], s.step));
      if (v.blocks.length) controls.append(select("block", "block", [["all", "mean of blocks"], ...v.blocks.map((x) => [x, x])], s.block));
      if (v.heads) controls.append(select("head", "head", [["mean", "mean of heads"], ...Array.from({ length: v.heads }, (_, i) => [i, i])], s.head));
      if (v.branches.length > 1) controls.append(select("branch", "branch", v.branches.map((b) => [b, b]), s.branch));
      controls.append(select("colormap", "colormap", Object.keys(d.colormaps).map((c) => [c, c]), s.colormap));
      controls.append(select("normalize", "normalise", Object.entries(d.normalize).map(([k, text]) => [k, k + ": " + text]), s.normalize));
      if (v.background) {
        const alpha = el("input", { type: "range", min: "0", max: "1", step: "0.05", value: String(s.alpha), "data-role": "alpha", "aria-label": "alpha" });
        this.alphaText = el("span", { text: fmt(s.alpha) });
        controls.append(el("label", { class: "am-control" }, el("span", { text: "overlay alpha" }), alpha, this.alphaText));
      }
      const frame = el("input", { type: "range", min: "0", max: String(v.frames - 1), step: "1", value: String(s.frame), "data-role": "frame", "aria-label": "frame" });
      this.frameText = el("span", { class: "am-frame-text" });
      const play = el("button", { type: "button", "data-role": "play", text: "play" });
      const canvas = el("canvas", { width: v.size[1], height: v.size[0], "data-role": "heatmap", class: "am-heatmap" });
      const zoom = Math.max(1, Math.floor(640 / v.size[1]));  // small videos are shown enlarged, pixel for pixel
      canvas.style.width = v.size[1] * zoom + "px";
      this.canvas = canvas;
      this.ctx = canvas.getContext("2d", { willReadFrequently: true });
      this.bar = el("canvas", { width: 14, height: 256, "data-role": "colorbar", class: "am-colorbar" });
      this.barTicks = el("div", { class: "am-ticks", "data-role": "colorbar-ticks" });
      this.label = el("div", { class: "am-label", "data-role": "label" });
      this.notice = el("div", { class: "am-note", "data-role": "notice" });
      const stage = el("div", { class: "am-stage" }, el("div", { class: "am-canvas-box" }, canvas, this.label),
        el("div", { class: "am-bar-box" }, this.bar, this.barTicks));
      const scrub = el("div", { class: "am-scrub" }, play, frame, this.frameText);
      this.panels = el("div", { class: "am-panels" });
      const notes = v.notes.length ? el("details", { class: "am-note" }, el("summary", { text: "left out of this page" }), ...v.notes.map((n) => el("div", { text: n }))) : null;
      this.root.append(...[head, controls, stage, scrub, this.notice, this.panels, notes].filter(Boolean));
      this.root.querySelectorAll("[data-role]").forEach((c) => {
        if (c.tagName === "SELECT") c.addEventListener("change", () => this.set(c.dataset.role, c.value));
        if (c.tagName === "INPUT") c.addEventListener("input", () => this.set(c.dataset.role, c.value));
      });
      play.addEventListener("click", () => this.toggle(play));
      this.update("video");
    }

    set(role, value) {
      const s = this.state;
      if (role === "video") { this.stop(); s.video = Number(value); this.build(); return; }
      if (role === "frame") s.frame = Number(value);
      else if (role === "alpha") { s.alpha = Number(value); this.alphaText.textContent = fmt(s.alpha); }
      else if (role === "step" || role === "block" || role === "head") s[role] = value === "mean" || value === "all" ? value : Number(value);
      else s[role] = value;
      this.update(role);
    }

    key(s) { return [s.token, s.step, s.block, s.head, s.branch].join("|"); }

    // the map shown: the one asked for, else the nearest that the page carries (other selections relaxed)
    resolve(changed) {
      const s = this.state, maps = this.video.maps;
      if (maps[this.key(s)]) return null;
      const defaults = { step: "mean", block: "all", head: "mean" };
      const dims = ["step", "block", "head"].filter((d) => d !== changed);
      for (const d of dims) {
        const trial = { ...s, [d]: defaults[d] };
        if (maps[this.key(trial)]) { s[d] = defaults[d]; return d; }
      }
      for (const d of ["step", "block", "head"]) s[d] = defaults[d];
      return "all";
    }

    update(changed) {
      const relaxed = this.resolve(changed);
      for (const role of ["step", "block", "head", "branch", "token", "frame", "colormap", "normalize"]) {
        const c = this.root.querySelector('[data-role="' + role + '"]');
        if (c && c.value !== String(this.state[role])) c.value = String(this.state[role]);
      }
      this.notice.textContent = relaxed ? "this page carries no map for that combination; showing the " + (relaxed === "all" ? "means" : "mean over " + relaxed + "s") + " instead" : "";
      this.schedule();
      if (changed !== "frame" && changed !== "alpha") this.drawPanels();
    }

    values() {
      const k = this.state.video + "|" + this.key(this.state) + "|" + this.state.normalize;
      if (!this.cache.has(k)) {
        if (this.cache.size > 64) this.cache.clear();
        const v = this.video, entry = v.maps[this.key(this.state)];
        const raw = dequantize(entry);
        const o = this.data.options;
        const rs = ranges(raw, v.grid[0], this.state.normalize, o.vmin, o.vmax);
        this.cache.set(k, { norm: normalized(raw, v.grid[0], rs), ranges: rs });
      }
      return this.cache.get(k);
    }

    async background(t) {
      const v = this.video;
      if (!v.background) return null;
      const k = this.state.video + "|" + t;
      if (!this.backgrounds.has(k)) {
        if (this.backgrounds.size > 96) this.backgrounds.clear();
        const blob = new Blob([bytes(v.background[t])], { type: "image/jpeg" });
        const image = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
        const c = document.createElement("canvas");
        c.width = v.size[1]; c.height = v.size[0];
        const ctx = c.getContext("2d", { willReadFrequently: true });
        ctx.drawImage(image, 0, 0);
        this.backgrounds.set(k, ctx.getImageData(0, 0, c.width, c.height).data);
      }
      return this.backgrounds.get(k);
    }

    schedule() {
      this.busy += 1;
      this.root.dataset.busy = String(this.busy);
      const generation = ++this.generation;
      this.queue = this.queue.then(() => (generation === this.generation ? this.draw() : null))
        .catch((e) => console.error("attnmap report:", e))
        .finally(() => { this.busy -= 1; this.root.dataset.busy = String(this.busy); });
      return this.queue;
    }

    async draw() {
      const v = this.video, s = this.state;
      const t = Math.max(0, Math.min(v.frames - 1, s.frame));
      const bg = await this.background(t);
      const { norm, ranges: rs } = this.values();
      const img = this.ctx.createImageData(v.size[1], v.size[0]);
      paint(norm, v.grid, this.taps, t, this.tables[s.colormap], bg, s.alpha, img.data);
      this.ctx.putImageData(img, 0, 0);
      this.drawBar(rs[this.taps.t.i0[t]]);
      const latent = this.taps.t.i0[t];
      this.frameText.textContent = "frame " + t + " / " + (v.frames - 1) + " (latent " + latent + ", t = " + (t / v.fps).toFixed(2) + " s)";
      const parts = [s.token, s.step === "mean" ? "mean of steps" : "step " + s.step];
      if (s.block !== "all") parts.push("block " + s.block);
      if (s.head !== "mean") parts.push("head " + s.head);
      if (s.branch !== "cond") parts.push(s.branch);
      this.label.textContent = parts.join(" \u00b7 ");
      this.root.dataset.rendered = String(Number(this.root.dataset.rendered) + 1);
    }

    drawBar(range) {
      const table = this.tables[this.state.colormap];
      const ctx = this.bar.getContext("2d");
      const img = ctx.createImageData(14, 256);
      for (let y = 0; y < 256; y++) for (let x = 0; x < 14; x++) {
        const level = 255 - y, o = (y * 14 + x) * 4;
        img.data[o] = table[level * 3]; img.data[o + 1] = table[level * 3 + 1]; img.data[o + 2] = table[level * 3 + 2]; img.data[o + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
      this.barTicks.replaceChildren(...ticks(range[0], range[1], 5).reverse().map((x) => el("span", { text: fmt(x) })));
    }

    toggle(button) {
      if (this.timer) { this.stop(); return; }
      button.textContent = "pause";
      const v = this.video;
      const tick = async () => {
        if (!this.timer) return;
        const started = performance.now();
        this.state.frame = (this.state.frame + 1) % v.frames;
        this.update("frame");
        await this.queue;
        if (this.timer) this.timer = setTimeout(tick, Math.max(0, 1000 / v.fps - (performance.now() - started)));
      };
      this.timer = setTimeout(tick, 0);
      this.playButton = button;
    }

    stop() {
      if (this.timer) clearTimeout(this.timer);
      this.timer = null;
      if (this.playButton) this.playButton.textContent = "play";
    }

    // side panels: frame-to-frame matrix, text self-attention, head locality, statistics
    pick(maps, s) {
      const keys = [[s.step, s.block, s.head], [s.step, s.block, "mean"], ["mean", s.block, s.head], [s.step, "all", "mean"], ["mean", "all", s.head], ["mean", "all", "mean"]];
      for (const k of keys) { const id = k.join("|"); if (maps[id]) return [id, maps[id]]; }
      return [null, null];
    }

    drawPanels() {
      const v = this.video, s = this.state;
      const viridis = this.tables.viridis || this.tables[s.colormap];
      const panels = [];
      const [id, entry] = this.pick(v.temporal, s);
      if (entry) {
        const n = entry.shape[0];
        const [step, block, head] = id.split("|");
        const what = [step === "mean" ? "mean of steps" : "step " + step, block === "all" ? "mean of blocks" : "block " + block, head === "mean" ? "mean of heads" : "head " + head].join(", ");
        panels.push(el("section", { class: "am-panel", "data-role": "temporal" },
          el("h3", { text: "frame to frame (" + what + ")" }),
          el("div", { class: "am-note", text: "row: query latent frame, column: key latent frame; the attention mass a frame's queries give each frame" }),
          matrix(floats(entry), n, n, viridis, { role: "temporal-matrix", rowName: "query frame", colName: "key frame" })));
      }
      if (v.text) {
        const k = "mean|all|" + s.head, e = v.text.maps[k] || v.text.maps["mean|all|mean"];
        const n = v.text.shown;
        panels.push(el("section", { class: "am-panel", "data-role": "text" },
          el("h3", { text: "text self-attention (" + n + " real tokens of " + v.text.stored + ")" }),
          el("div", { class: "am-note", text: "real tokens from " + v.text.how }),
          matrix(floats(e), n, n, viridis, { role: "text-matrix", rowName: "query", colName: "key", labels: v.text.labels }),
          n <= 40 ? el("div", { class: "am-note am-words", text: v.text.labels.map((w, i) => i + ": " + w).join("  ") }) : null));
      }
      if (v.locality) {
        const L = v.locality, magma = this.tables.magma || viridis;
        const table = el("table", { class: "am-locality", "data-role": "locality" });
        const heads = L.values[0].length;
        table.append(el("tr", {}, el("th", { text: "block \\ head" }), ...Array.from({ length: heads }, (_, h) => el("th", { text: heads > 1 ? String(h) : "all" }))));
        L.values.forEach((row, r) => {
          table.append(el("tr", {}, el("th", { text: L.blocks[r] }), ...row.map((x, h) => {
            const level = Math.min(255, Math.max(0, Math.floor(x * 256)));
            const rgb = [0, 1, 2].map((c) => magma[level * 3 + c]);
            const cls = L.classes[r][h];
            return el("td", { style: "background: rgb(" + rgb.join(",") + "); color: " + (x < 0.6 ? "#fff" : "#000"), title: cls + " head: " + fmt(x) + " of its mass in its own frame", text: x.toFixed(2) + " " + cls[0].toUpperCase() });
          })));
        });
        panels.push(el("section", { class: "am-panel" }, el("h3", { text: "temporal locality and head classes" }),
          el("div", { class: "am-note", text: "mass a query keeps in its own frame (1: spatial, 1/" + L.frames + ": spread evenly); S spatial, T temporal" }), table));
      }
      for (const [name, stat] of Object.entries(v.stats)) panels.push(this.statPanel(name, stat, viridis));
      this.panels.replaceChildren(...panels);
    }

    statPanel(name, stat, table) {
      let values = floats(stat), shape = stat.shape.slice();
      if (stat.heads) {
        const H = shape[0], n = values.length / H, h = this.state.head;
        const out = new Float32Array(n);
        if (h === "mean") { for (let k = 0; k < H; k++) for (let i = 0; i < n; i++) out[i] += values[k * n + i] / H; }
        else out.set(values.subarray(h * n, (h + 1) * n));
        values = out; shape = shape.slice(1);
      }
      let sum = 0, count = 0, lo = Infinity, hi = -Infinity;
      for (const x of values) if (Number.isFinite(x)) { sum += x; count++; lo = Math.min(lo, x); hi = Math.max(hi, x); }
      const summary = "shape " + stat.shape.join(" x ") + (stat.heads ? " (heads first; head: " + this.state.head + ")" : "") + " \u00b7 mean " + fmt(sum / Math.max(1, count)) + ", min " + fmt(lo) + ", max " + fmt(hi);
      const body = el("div", {});
      const grid = this.video.grid;
      if (shape.length === 1 && shape[0] === grid[0] * grid[1] * grid[2]) shape = grid.slice();  // one value per video token
      if (shape.length === 2) body.append(matrix(values, shape[0], shape[1], table, { role: "stat-matrix", rowName: "row", colName: "col" }));
      else if (shape.length === 1) body.append(line(values, { role: "stat-line", xName: stat.kind === "entropy" ? "query" : "key" }));
      else if (shape.length === 3) {
        const n = shape[1] * shape[2];
        const sums = new Float32Array(shape[0]);
        for (let f = 0; f < shape[0]; f++) for (let i = 0; i < n; i++) sums[f] += values[f * n + i];
        const slider = el("input", { type: "range", min: "0", max: String(shape[0] - 1), value: "0", "data-role": "stat-slice", "aria-label": "slice" });
        const label = el("div", { class: "am-note" });
        const holder = el("div", {});
        const show = () => {
          const f = Number(slider.value);
          label.textContent = (stat.kind === "distance" ? "|dt| = " : "frame ") + f + " (rows " + (stat.kind === "distance" ? "|dy|" : "y") + ", columns " + (stat.kind === "distance" ? "|dx|" : "x") + ")";
          holder.replaceChildren(matrix(values.subarray(f * n, (f + 1) * n), shape[1], shape[2], table, { role: "stat-matrix" }));
        };
        slider.addEventListener("input", show);
        show();
        body.append(el("div", { class: "am-note", text: stat.kind === "distance" ? "mass by frame offset |dt|:" : "sum per frame:" }),
          line(sums, { role: "stat-line", xName: stat.kind === "distance" ? "|dt|" : "frame" }), slider, label, holder);
      }
      return el("section", { class: "am-panel", "data-role": "stat" }, el("h3", { text: name }), el("div", { class: "am-note", text: summary }), body);
    }
  }

  const viewers = [];
  function mount(root) {
    if (!root || root.dataset.mounted) return null;
    root.dataset.mounted = "1";
    const data = JSON.parse(document.getElementById(root.id + "-data").textContent);
    const viewer = new Viewer(root, data);
    viewers.push(viewer);
    return viewer;
  }
  const api = { mount, viewers, paint, linearTaps, strideTaps, ranges, normalized, dequantize };
  window.attnmapReport = api;
  return api;
})();
