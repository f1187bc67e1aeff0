// MNIST's preparation of a digit image, and the network's forward pass, for the exported page.
//
// The twin of mlecli/use/preparation.py, step for step, to the bit: each step is elementwise (the
// same IEEE operations in the same order), a sum taken first to last on both sides, or a
// sum of integers below 2^53 (exact in any order: numpy's BLAS products give the same), so
// that the page and `mlecli predict` prepare a drawing to the same 28×28 pixels. The steps
// are written out in prepare.py's docstring and in docs/predict.md. No DOM here: pure
// functions on arrays.
"use strict";

var MlecliPrepare = (function () {
  var FRAME = 28;  // see mlecli/use/preparation.py
  // Styles: MNIST's (a 20-pixel box placed by its centre of mass at 14.5) and Fashion-MNIST's.
  var STYLES = {
    "mnist": { box: 20, centre: "mass", target: 14.5 },
    "fashion-mnist": { box: 28, centre: "box", target: 14.0 }
  };
  var MAD_TO_SIGMA = 1.4826, Q90_SIGMAS = 1.6449, FAINT = 16.0, NOISE_CUT = 3.0, MIN_CONTRAST = 0.1, BLANK_NOISE = 8.0, TRIM = 0.005;
  var LEVELS = 65535;  // step 6: the crop's levels as integers, so that every sum after is exact

  // RGBA bytes (as getImageData gives) -> gray in [0, 1]: ITU-R 601 luma / 255.
  function luminance(rgba, n) {
    var g = new Float64Array(n);
    for (var k = 0; k < n; k++) {
      g[k] = (0.299 * rgba[4 * k] + 0.587 * rgba[4 * k + 1] + 0.114 * rgba[4 * k + 2]) / 255.0;
    }
    return g;
  }

  // Transparency filled with the colour opposite the ink (white behind dark ink, black behind light),
  // decided in integers as prepare.py's background_behind: Σ a·(299 R + 587 G + 114 B) < ½·255000·Σ a.
  function composite(rgba, n) {
    var lum = luminance(rgba, n);
    var opaque = true;
    for (var k = 0; k < n; k++) if (rgba[4 * k + 3] !== 255) { opaque = false; break; }
    if (opaque) return lum;
    var weighted = 0, total = 0;
    for (k = 0; k < n; k++) {
      var a = rgba[4 * k + 3];
      weighted += a * (299 * rgba[4 * k] + 587 * rgba[4 * k + 1] + 114 * rgba[4 * k + 2]);
      total += a;
    }
    var back = (2 * weighted < 255000 * total || total === 0) ? 1.0 : 0.0;
    for (k = 0; k < n; k++) {
      var alpha = rgba[4 * k + 3] / 255.0;
      lum[k] = alpha * lum[k] + (1.0 - alpha) * back;
    }
    return lum;
  }

  function median(values) {
    var s = Float64Array.from(values).sort();
    var n = s.length, mid = n >> 1;
    return n % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
  }

  // The border pixels: first and last rows, then the rest of the first and last columns.
  function ring(g, w, h) {
    if (h <= 2) return Float64Array.from(g);
    var out = new Float64Array(2 * w + 2 * (h - 2)), k = 0, i, j;
    for (j = 0; j < w; j++) out[k++] = g[j];
    for (j = 0; j < w; j++) out[k++] = g[(h - 1) * w + j];
    for (i = 1; i < h - 1; i++) out[k++] = g[i * w];
    for (i = 1; i < h - 1; i++) out[k++] = g[i * w + w - 1];
    return out;
  }

  // Step 5 along one axis: first index whose running total exceeds trim·total, last index whose
  // total from the end does (each total added in its own direction, as numpy's cumsum does).
  function box(profile, trim) {
    var n = profile.length, ahead = new Float64Array(n), behind = new Float64Array(n), i;
    ahead[0] = profile[0];
    for (i = 1; i < n; i++) ahead[i] = ahead[i - 1] + profile[i];
    behind[n - 1] = profile[n - 1];
    for (i = n - 2; i >= 0; i--) behind[i] = behind[i + 1] + profile[i];
    var limit = trim * ahead[n - 1], first = 0, last = n - 1;
    while (!(ahead[first] > limit) && first < n - 1) first++;
    while (!(behind[last] > limit) && last > 0) last--;
    return [first, last];
  }

  // A[i * m + a]: overlap of box pixel [i·n, (i+1)·n) with crop pixel [a·B, (a+1)·B), in units of
  // 1/n of a box pixel (n = the crop's longer side): integers, as prepare.py's overlaps.
  function overlaps(m, n, B) {
    var A = new Float64Array(B * m);
    for (var i = 0; i < B; i++) {
      for (var a = 0; a < m; a++) {
        A[i * m + a] = Math.max(0.0, Math.min((i + 1.0) * n, (a + 1.0) * B) - Math.max(i * n, a * B));
      }
    }
    return A;
  }

  // gray (w·h, row-major, 0 black … 1 white) -> {image: Uint8Array(784), steps} or {blank: true}.
  // styleName: "mnist" (the default) or "fashion-mnist".
  function prepare(gray, w, h, styleName) {
    var style = STYLES[styleName || "mnist"], B = style.box;
    var n = w * h, k, i, j, a, b;
    var g = Float64Array.from(gray);
    var border = ring(g, w, h);
    var m = median(border);
    var lowest = Infinity, highest = -Infinity;
    for (k = 0; k < n; k++) { if (g[k] < lowest) lowest = g[k]; if (g[k] > highest) highest = g[k]; }
    var inverted = m - lowest > highest - m;
    if (inverted) {
      for (k = 0; k < n; k++) g[k] = 1.0 - g[k];
      for (k = 0; k < border.length; k++) border[k] = 1.0 - border[k];
      m = 1.0 - m;
    }
    var p = -Infinity;
    for (k = 0; k < n; k++) if (g[k] > p) p = g[k];
    var dev = new Float64Array(border.length);
    for (k = 0; k < border.length; k++) dev[k] = Math.abs(border[k] - m);
    dev.sort();
    var sigma = MAD_TO_SIGMA * median(dev), nFaint = 0, limit = (p - m) / FAINT;
    while (nFaint < dev.length && dev[nFaint] < limit) nFaint++;
    if (nFaint > 0) sigma = Math.max(sigma, dev[Math.floor(0.9 * (nFaint - 1))] / Q90_SIGMAS);
    if (p - m < Math.max(MIN_CONTRAST, BLANK_NOISE * sigma)) {
      return { blank: true, steps: { inverted: inverted, background: m, noise: sigma, peak: p } };
    }
    var lo = m + NOISE_CUT * sigma, hi = p - NOISE_CUT * sigma;
    var v = new Float64Array(n);
    for (k = 0; k < n; k++) v[k] = Math.min(Math.max((g[k] - lo) / (hi - lo), 0.0), 1.0);

    var rows = new Float64Array(h), cols = new Float64Array(w);
    for (i = 0; i < h; i++) {
      var acc = v[i * w];
      for (j = 1; j < w; j++) acc += v[i * w + j];
      rows[i] = acc;
    }
    for (j = 0; j < w; j++) cols[j] = v[j];
    for (i = 1; i < h; i++) for (j = 0; j < w; j++) cols[j] += v[i * w + j];
    var trim = sigma > 0 ? TRIM : 0.0;
    var rb = box(rows, trim), cb = box(cols, trim);
    var r0 = rb[0], r1 = rb[1], c0 = cb[0], c1 = cb[1];
    var bh = r1 - r0 + 1, bw = c1 - c0 + 1;
    var nBox = Math.max(bh, bw), s = B / nBox;
    var Ly = overlaps(bh, nBox, B), Lx = overlaps(bw, nBox, B);

    // 6. T = Ay · V · Axᵀ (B × B) in integers: V = ⌊65535·crop + ½⌋; U = Ay · V (B × bw), T = U · Axᵀ.
    var V = new Float64Array(bh * bw);
    for (a = 0; a < bh; a++) {
      for (b = 0; b < bw; b++) V[a * bw + b] = Math.floor(v[(r0 + a) * w + c0 + b] * LEVELS + 0.5);
    }
    var U = new Float64Array(B * bw);
    for (i = 0; i < B; i++) {
      for (a = 0; a < bh; a++) {
        var wy = Ly[i * bh + a];
        if (wy === 0) continue;
        for (b = 0; b < bw; b++) U[i * bw + b] += wy * V[a * bw + b];
      }
    }
    var T = new Float64Array(B * B), tmax = 0.0;
    for (i = 0; i < B; i++) {
      for (j = 0; j < B; j++) {
        var sum = 0.0;
        for (b = 0; b < bw; b++) {
          var wx = Lx[j * bw + b];
          if (wx !== 0) sum += U[i * bw + b] * wx;
        }
        T[i * B + j] = sum;
        if (sum > tmax) tmax = sum;
      }
    }
    // 7. quantise, the peak 255; 8. the centre: of mass (integer sums: exact in any order), or of the box.
    var q = new Uint8Array(B * B), total = 0, my = 0, mx = 0;
    for (i = 0; i < B; i++) {
      for (j = 0; j < B; j++) {
        var qv = Math.floor(255.0 * (T[i * B + j] / tmax) + 0.5);
        q[i * B + j] = qv;
        total += qv;
        my += (i + 0.5) * qv;
        mx += (j + 0.5) * qv;
      }
    }
    var cy = style.centre === "mass" ? my / total : s * bh / 2;
    var cx = style.centre === "mass" ? mx / total : s * bw / 2;
    // 9. place by whole pixels; what falls outside the 28×28 frame is lost.
    var dy = Math.floor(style.target - cy + 0.5), dx = Math.floor(style.target - cx + 0.5);
    var image = new Uint8Array(FRAME * FRAME);
    for (i = 0; i < B; i++) {
      var y = dy + i;
      if (y < 0 || y >= FRAME) continue;
      for (j = 0; j < B; j++) {
        var x = dx + j;
        if (x >= 0 && x < FRAME) image[y * FRAME + x] = q[i * B + j];
      }
    }
    return {
      blank: false,
      image: image,
      steps: {
        inverted: inverted, background: m, noise: sigma, peak: p, box: [r0, r1, c0, c1],
        scale: s, offset: [dy, dx], centre: [cy, cx]
      }
    };
  }

  // layers: [{W: Float32Array (nIn·nOut, row-major nIn × nOut), b: Float32Array(nOut), nIn, nOut}].
  // image: Uint8Array(784) -> ŷ = σ(z), with σ(z) = ½(1 + tanh(z/2)) as in mlecli/nn/model.py.
  function forward(layers, image) {
    var h = new Float64Array(image.length), k;
    for (k = 0; k < image.length; k++) h[k] = image[k] / 255.0;
    var z = 0.0;
    for (var l = 0; l < layers.length; l++) {
      var L = layers[l], out = new Float64Array(L.nOut);
      for (var i = 0; i < L.nIn; i++) {
        var x = h[i];
        if (x === 0) continue;
        var base = i * L.nOut;
        for (var j = 0; j < L.nOut; j++) out[j] += x * L.W[base + j];
      }
      for (j = 0; j < L.nOut; j++) out[j] += L.b[j];
      if (l === layers.length - 1) { z = out[0]; break; }
      for (j = 0; j < L.nOut; j++) out[j] = 0.5 * (1.0 + Math.tanh(0.5 * out[j]));
      h = out;
    }
    return { z: z, p: 0.5 * (1.0 + Math.tanh(0.5 * z)) };
  }

  return {
    FRAME: FRAME, STYLES: STYLES, luminance: luminance, composite: composite, median: median, ring: ring,
    overlaps: overlaps, prepare: prepare, forward: forward
  };
})();
