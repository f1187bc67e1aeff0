// The page: drawing with mouse, pen or finger, and ŷ live as you draw.
//
// Reads the model (weights and the run's description) from the JSON in #mlecli-model,
// prepares the drawing with MlecliPrepare (the twin of mlecli/use/preparation.py) and shows
// ŷ = P(y = 1) between the task's two words. window.mlecli exposes the current state
// (ŷ, the prepared 28×28 image, the preparation's steps) for tests and the curious.
"use strict";

(function () {
  var model = JSON.parse(document.getElementById("mlecli-model").textContent);

  function floats(b64, dtype) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var k = 0; k < bin.length; k++) bytes[k] = bin.charCodeAt(k);
    return dtype === "float64" ? new Float64Array(bytes.buffer) : new Float32Array(bytes.buffer);
  }
  var layers = model.layers.map(function (L) {
    return { W: floats(L.W, model.dtype), b: floats(L.b, model.dtype), nIn: L.n_in, nOut: L.n_out };
  });

  var canvas = document.getElementById("draw");
  var ctx = canvas.getContext("2d", { willReadFrequently: true });
  var seen = document.getElementById("seen").getContext("2d");
  var marker = document.getElementById("marker");
  var verdict = document.getElementById("verdict");
  var yhatText = document.getElementById("yhat");
  var hint = document.getElementById("hint");
  var neg = model.words[0], pos = model.words[1];

  var state = { yhat: null, z: null, prepared: null, blank: true, steps: null, updates: 0 };
  window.mlecli = { state: state, model: model, update: update, clear: clear, prepare: MlecliPrepare };

  function clear() {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    update();
  }

  // --- drawing ---------------------------------------------------------
  var drawing = false, last = null;
  function point(e) {
    var r = canvas.getBoundingClientRect();
    return { x: (e.clientX - r.left - canvas.clientLeft) * canvas.width / canvas.clientWidth,
             y: (e.clientY - r.top - canvas.clientTop) * canvas.height / canvas.clientHeight };
  }
  function stroke(a, b) {
    if (a.x === b.x && a.y === b.y) {  // a tap or a click: a dot (a zero-length line draws nothing)
      ctx.fillStyle = "#000";
      ctx.beginPath();
      ctx.arc(a.x, a.y, model.line_width / 2, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    ctx.strokeStyle = "#000";
    ctx.lineWidth = model.line_width;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x, b.y);
    ctx.stroke();
  }
  canvas.addEventListener("pointerdown", function (e) {
    if (e.button !== 0 && e.pointerType === "mouse") return;
    drawing = true;
    canvas.setPointerCapture(e.pointerId);
    last = point(e);
    stroke(last, last);
    schedule();
    e.preventDefault();
  });
  canvas.addEventListener("pointermove", function (e) {
    if (!drawing) return;
    var events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
    if (!events.length) events = [e];
    events.forEach(function (ev) {
      var p = point(ev);
      stroke(last, p);
      last = p;
    });
    schedule();
  });
  function end() { if (drawing) { drawing = false; last = null; schedule(); } }
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  document.getElementById("clear").addEventListener("click", clear);
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape" || e.key === "Delete" || e.key === "Backspace") clear();
  });

  var pending = false;
  function schedule() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(function () { pending = false; update(); });
  }

  // --- predicting ------------------------------------------------------
  function update() {
    var w = canvas.width, h = canvas.height;
    var rgba = ctx.getImageData(0, 0, w, h).data;
    var result = MlecliPrepare.prepare(MlecliPrepare.composite(rgba, w * h), w, h, model.style);
    state.updates += 1;
    state.steps = result.steps;
    state.blank = result.blank;
    var img = seen.createImageData(28, 28);
    if (result.blank) {
      state.yhat = state.z = state.prepared = null;
      for (var k = 0; k < 784; k++) img.data[4 * k + 3] = 255;
      seen.putImageData(img, 0, 0);
      marker.hidden = true;
      hint.hidden = false;
      verdict.textContent = "";
      yhatText.textContent = "";
      document.body.removeAttribute("data-yhat");
      return;
    }
    var out = MlecliPrepare.forward(layers, result.image);
    state.yhat = out.p;
    state.z = out.z;
    state.prepared = Array.prototype.slice.call(result.image);
    for (k = 0; k < 784; k++) {
      var v = result.image[k];
      img.data[4 * k] = img.data[4 * k + 1] = img.data[4 * k + 2] = v;
      img.data[4 * k + 3] = 255;
    }
    seen.putImageData(img, 0, 0);
    hint.hidden = true;
    marker.hidden = false;
    marker.style.left = (100 * out.p).toFixed(2) + "%";
    // Decided from z, as every mlecli command decides (mlecli/nn/metrics.py): ŷ ≥ t exactly where
    // z ≥ logit(t); ŷ itself, a rounded number, is 0.5 for every |z| below 1e-16.
    var positive = out.z >= model.z_threshold;
    verdict.textContent = "";
    verdict.appendChild(document.createTextNode("The network says: "));
    var b = document.createElement("b");
    b.className = positive ? "pos" : "neg";
    b.textContent = positive ? pos : neg;
    verdict.appendChild(b);
    yhatText.textContent = "ŷ = P(" + pos + ") = " + out.p.toFixed(4);
    document.body.setAttribute("data-yhat", String(out.p));
  }

  // --- the words and the footer ----------------------------------------
  document.getElementById("neg").textContent = "← " + neg;
  document.getElementById("pos").textContent = pos + " →";
  document.getElementById("title").textContent = model.heading;
  document.getElementById("question").textContent = model.question;
  document.getElementById("seen-caption").textContent = model.seen;
  var footer = document.getElementById("footer");
  model.footer.forEach(function (text) {
    var span = document.createElement("span");
    span.textContent = text;
    footer.appendChild(span);
  });
  clear();
})();
