"use strict";
(function () {
  const kind = document.getElementById("map-kind");
  function showMaps(frame, k) {
    frame.querySelectorAll("img.map").forEach(function (m) { m.hidden = m.dataset.kind !== k; });
  }
  if (kind) {
    kind.addEventListener("change", function () {
      document.querySelectorAll(".frame").forEach(function (f) { showMaps(f, kind.value); });
    });
    document.querySelectorAll(".frame").forEach(function (f) {
      f.addEventListener("click", function () {
        const shown = f.querySelector("img.map:not([hidden])");
        showMaps(f, shown ? "none" : (kind.value === "none" ? "quality" : kind.value));
      });
    });
  }
  const order = document.getElementById("order");
  if (order) {
    order.addEventListener("change", function () {
      const g = document.getElementById("gallery");
      const cards = Array.from(g.children);
      cards.sort(function (a, b) {
        const d = parseFloat(a.dataset.score) - parseFloat(b.dataset.score);
        return order.value === "best" ? -d : d;
      });
      cards.forEach(function (c) { g.appendChild(c); });
    });
  }
  const dataNode = document.getElementById("histogram-data");
  if (dataNode) {
    const h = JSON.parse(dataNode.textContent);
    const slider = document.getElementById("threshold");
    const cut = document.getElementById("cut");
    function update() {
      const i = parseInt(slider.value, 10);
      const t = h.thresholds[i];
      document.getElementById("threshold-value").textContent = t.toFixed(4);
      document.getElementById("pass-count").textContent = String(h.passing[i]);
      const x = h.hi > h.lo ? (t - h.lo) / (h.hi - h.lo) * h.bins * 10 : 0;
      cut.setAttribute("x1", x); cut.setAttribute("x2", x);
      document.querySelectorAll("rect.bin").forEach(function (r) {
        r.classList.toggle("below", parseFloat(r.dataset.hi) <= t);
      });
    }
    slider.addEventListener("input", update);
    update();
  }
})();
